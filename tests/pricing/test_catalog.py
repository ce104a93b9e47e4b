"""Catalog files: read exactly as written, rejected with errors a person can act on."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tollway.errors import CatalogError
from tollway.pricing.catalog import load_catalog, parse_catalog
from tollway.pricing.rating import CallPrice, TokenPrice

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"

GOOD = """
providers:
  openai: {kind: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
  search: {kind: http, base_url: "https://search.example.com", auth: {header: X-API-Key}}
groups:
  default: {ratio: "1"}
  vip: {ratio: 0.8}
models:
  - id: gpt-4o-mini
    provider: openai
    price: {input: 0.2009, output: "0.60", cache_read: 0.075}
    max_output_tokens: 16384
    group_ratios: {vip: "0.7"}
endpoints:
  - id: web-search
    name: Web search
    provider: search
    method: GET
    path: /search/web
    upstream_path: /v2/search
    price: {per_call: 0.002}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, source="cat.yaml")
    return info.value.problems


def test_yaml_numbers_are_read_exactly_as_written() -> None:
    catalog = parse_catalog(GOOD)
    model, endpoint = catalog.listings
    assert isinstance(model.price, TokenPrice)
    assert model.price.input_per_1m == Decimal("0.2009")
    assert str(model.price.input_per_1m) == "0.2009"  # never through a binary float
    assert model.price.cache_read_per_1m == Decimal("0.075")
    assert model.price.cache_write_per_1m is None
    assert model.group_ratios == {"vip": Decimal("0.7")}
    assert model.spec.upstream_model == "gpt-4o-mini" and model.spec.max_output_tokens == 16384
    assert isinstance(endpoint.price, CallPrice) and endpoint.price.per_call == Decimal("0.002")
    assert (endpoint.spec.method, endpoint.spec.path, endpoint.spec.upstream_path) == (
        "GET", "/search/web", "/v2/search")
    assert catalog.groups == {"default": Decimal(1), "vip": Decimal("0.8")}


def test_example_catalog_loads() -> None:
    catalog = load_catalog(EXAMPLE)
    assert {item.billing_type for item in catalog.listings} == {"token", "per_call"}


def test_every_problem_names_file_item_and_field() -> None:
    found = problems("""
providers:
  p: {kind: sandbox}
groups:
  vip: {ratio: "0"}
  cheap: {ratio: "-1"}
models:
  - {id: a, provider: nowhere, price: {input: "1", output: "1"}}
  - {id: b, provider: p, price: {input: "-0.5", output: "abc"}}
  - {id: c, provider: p, price: {output: "1"}}
  - {id: b, provider: p, price: {input: "1", output: "1"}}
  - {id: d, provider: p}
  - {id: e, provider: p, price: {input: "0.0000000001", output: "1"}}
endpoints:
  - {id: s, provider: p, path: /x, price: {}}
""")
    assert found == [
        "cat.yaml: groups[vip].ratio: must be greater than 0, got 0",
        "cat.yaml: groups[cheap].ratio: must be greater than 0, got -1",
        "cat.yaml: models[a].provider: unknown provider 'nowhere' (known: p)",
        "cat.yaml: models[b].price.input: price must not be negative, got '-0.5'",
        "cat.yaml: models[b].price.output: price 'abc' is not a number",
        "cat.yaml: models[c].price.input: missing price (USD per 1M tokens)",
        "cat.yaml: models[d].price: a price is required",
        "cat.yaml: models[e].price.input: price '0.0000000001' has more than 9 decimal places",
        "cat.yaml: endpoints[s].price.per_call: missing price (USD per call)",
    ]


def test_duplicate_ids_and_routes_are_refused() -> None:
    found = problems("""
providers: {p: {kind: sandbox}}
models:
  - {id: m, provider: p, price: {input: "1", output: "1"}}
endpoints:
  - {id: m, provider: p, path: /a, price: {per_call: "1"}}
  - {id: u1, provider: p, path: "/user/{name}", price: {per_call: "1"}}
  - {id: u2, provider: p, path: "/user/{id}", price: {per_call: "1"}}
""")
    assert found == [
        "cat.yaml: endpoints[m].id: duplicate id (also in models)",
        "cat.yaml: endpoints[u2].path: GET /user/{id} is already served by endpoint u1",
    ]


def test_override_for_unknown_group_and_bad_provider() -> None:
    found = problems("""
providers:
  o: {kind: openai}
  x: {kind: grpc}
models:
  - {id: m, provider: o, price: {input: "1", output: "1"}, group_ratios: {gold: "0.5"}}
""")
    assert found == [
        "cat.yaml: providers[o].base_url: an http(s) URL is required for kind 'openai', got None",
        "cat.yaml: providers[x].kind: must be one of openai, anthropic, http, sandbox, got 'grpc'",
        "cat.yaml: models[m].group_ratios.gold: unknown group",
    ]


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    assert problems("models: [unclosed") == [
        ("cat.yaml: line 1, column 18: not valid YAML: expected ',' or ']', but got "
         "'<stream end>' (while parsing a flow sequence from line 1, column 9)")]
    with pytest.raises(CatalogError) as info:
        load_catalog(tmp_path / "missing.yaml")
    assert "missing.yaml: cannot read file" in info.value.problems[0]


def test_infinite_price_is_refused() -> None:
    found = problems("""
providers: {p: {kind: sandbox}}
models:
  - {id: m, provider: p, price: {input: .inf, output: "1"}}
""")
    assert found == ["cat.yaml: models[m].price.input: price '.inf' is not a number"]


def test_default_group_always_exists() -> None:
    catalog = parse_catalog("providers: {p: {kind: sandbox}}\n")
    assert catalog.groups == {"default": Decimal(1)}


def test_endpoint_path_parameters_are_checked() -> None:
    found = problems("""
providers: {p: {kind: sandbox}}
endpoints:
  - {id: a, provider: p, path: "/u/{user-name}", price: {per_call: "1"}}
  - {id: b, provider: p, path: "/v/{id}/{id}", price: {per_call: "1"}}
  - {id: c, provider: p, path: "/w/{name}", upstream_path: "/x/{other}", price: {per_call: "1"}}
""")
    assert found == [
        ("cat.yaml: endpoints[a].path: path parameter {user-name} must be a name of letters, "
         "digits and _"),
        "cat.yaml: endpoints[b].path: a path parameter appears twice",
        "cat.yaml: endpoints[c].upstream_path: {other} is not a parameter of path /w/{name}",
    ]


PROTOCOLS = """
providers:
  router: {kind: openai, base_url: "https://router.example/v1"}
  claude: {kind: anthropic, base_url: "https://api.anthropic.com/v1"}
  sandbox: {kind: sandbox}
models:
  - id: claude-sonnet
    provider: router
    providers: {anthropic: claude}
    price: {input: "3", output: "15", cache_read: "0.30", cache_write: "3.75",
            cache_write_1h: "6"}
  - id: claude-direct
    providers: {anthropic: claude}
    price: {input: "3", output: "15"}
  - id: painter
    provider: sandbox
    price: {per_call: "0.04", per_size: {"1024x1024": "0.04", "1792x1024": "0.08"}}
"""


def test_a_model_lists_a_provider_per_protocol_at_one_price() -> None:
    both, direct, painter = parse_catalog(PROTOCOLS).listings
    assert both.provider == "router"
    assert both.spec.providers == {"openai": "router", "anthropic": "claude"}
    assert isinstance(both.price, TokenPrice)
    assert both.price.cache_write_1h_per_1m == Decimal("6")
    assert both.spec.as_dict()["providers"] == {"openai": "router", "anthropic": "claude"}
    # no `provider`: the first of `providers` is the item's provider
    assert (direct.provider, direct.spec.providers) == ("claude", {"anthropic": "claude"})
    # an image model: in `models`, priced per image, a sandbox speaks both protocols
    assert painter.kind == "model" and painter.billing_type == "per_call"
    assert isinstance(painter.price, CallPrice)
    assert painter.price.per_size == {"1024x1024": Decimal("0.04"),
                                      "1792x1024": Decimal("0.08")}
    assert painter.price.for_size(None) == Decimal("0.04")
    assert painter.price.for_size("1792x1024") == Decimal("0.08")
    assert painter.price.for_size("256x256") is None


def test_protocol_providers_must_speak_the_protocol() -> None:
    found = problems("""
providers:
  router: {kind: openai, base_url: "https://router.example/v1"}
  data: {kind: http, base_url: "https://data.example"}
models:
  - id: m
    provider: router
    providers: {anthropic: router, grpc: router, openai: nowhere}
    price: {input: "1", output: "1", cache_write_1h: "-1"}
  - id: img
    provider: router
    price: {per_call: "0.04", per_size: {"1024x1024": "x"}, input: "1"}
    max_output_tokens: 10
""")
    assert found == [
        ("cat.yaml: models[m].providers.anthropic: provider 'router' (kind openai) does not "
        "speak the anthropic protocol"),
        "cat.yaml: models[m].providers.grpc: unknown protocol (openai or anthropic)",
        "cat.yaml: models[m].providers.openai: unknown provider 'nowhere'",
        found[3],
        ("cat.yaml: models[img].price.input: unknown price field (image models take per_call "
        "and optional per_size and per_quality, in USD per image)"),
        "cat.yaml: models[img].max_output_tokens: an image model has no output tokens",
        found[6],
    ]
    assert found[3].startswith("cat.yaml: models[m].price.cache_write_1h: ")
    assert found[6].startswith("cat.yaml: models[img].price.per_size.1024x1024: ")


def test_routes_narrow_a_model_to_routes_its_providers_serve() -> None:
    narrowed = parse_catalog(PROTOCOLS.replace(
        "  - id: claude-direct\n", "  - id: claude-direct\n    routes: [/v1/messages]\n"))
    assert narrowed.listings[1].spec.routes == ("/v1/messages",)
    assert narrowed.listings[1].spec.as_dict()["routes"] == ["/v1/messages"]
    assert narrowed.listings[0].spec.routes is None  # every route of its protocols
    found = problems(PROTOCOLS.replace(
        "  - id: claude-direct\n",
        "  - id: claude-direct\n    routes: [/v1/messages, /v1/chat/completions]\n"))
    assert found == [("cat.yaml: models[claude-direct].routes: '/v1/chat/completions' is not "
                     "served by the model's providers (they serve /v1/messages)")]


def test_context_window_tool_fees_and_qualities_are_validated() -> None:
    """``context_window`` is a positive integer on token models only; ``tool_calls`` and
    ``per_quality`` are USD (``per_quality`` per size too), each problem named."""
    text = """
providers: {p: {kind: openai, base_url: "http://x/v1"}}
groups: {default: {ratio: "1"}}
models:
  - {id: a, provider: p, price: {input: "1", output: "2"}, context_window: 0}
  - {id: b, provider: p, price: {input: "1", output: "2", tool_calls: {web_search: "-1"}},
     context_window: "big"}
  - {id: c, provider: p, price: {per_call: "0.04", per_quality: {high: "x",
     low: {"1024x1024": "-0.1"}}}, context_window: 10}
  - {id: d, provider: p, price: {input: "1", output: "2", tool_calls: {web_search: "0.01"}},
     context_window: 128000}
  - {id: e, provider: p, price: {per_call: "0.04", per_quality: {high: "0.17",
     low: {"1024x1024": "0.011"}}}}
"""
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text, source="cat.yaml")
    found = [p for p in caught.value.problems if "models[" in p]
    for where in ("models[a].context_window: must be a positive integer",
                  "models[b].context_window: must be a positive integer",
                  "models[b].price.tool_calls.web_search:",
                  "models[c].price.per_quality.high:",
                  "models[c].price.per_quality.low.1024x1024:",
                  "models[c].context_window: an image model has no input tokens"):
        assert any(where in p for p in found), (where, found)
    good = parse_catalog(text.split("  - {id: a")[0] + "  - {id: d" + text.split("  - {id: d")[1])
    by_id = {item.id: item for item in good.listings}
    assert by_id["d"].spec.input_bound == 128_000
    assert by_id["d"].price.tool_price("web_search") == Decimal("0.01")  # type: ignore[union-attr]
    assert dict(by_id["e"].price.per_quality) == {  # type: ignore[union-attr]
        "high": Decimal("0.17"), "low:1024x1024": Decimal("0.011")}
