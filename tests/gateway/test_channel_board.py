"""Channel selection and circuit breaking without a network (``upstreams.channels``), and the
catalog's ``channels:`` shape. The clock is a number the test moves."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from tollway.errors import CatalogError
from tollway.pricing.catalog import ChannelSpec, ItemSpec, parse_catalog
from tollway.pricing.rating import TokenPrice
from tollway.upstreams.channels import Board, Policy, parse_statuses

PROVIDERS = {"a": ("openai", {}), "b": ("openai", {}), "c": ("anthropic", {}),
             "pool": ("openai", {"api_key_envs": ["K1", "K2", "K3"]})}


def board(*channels: ChannelSpec, policy: Policy | None = None, seed: int = 7,
          disabled: tuple[str, ...] = ()) -> Board:
    b = Board(policy or Policy(failures=2, cooldown_ms=30_000), random.Random(seed))
    spec = ItemSpec(upstream_model="m-up", channels=channels)
    b.configure([("m", spec, channels[0].provider)], PROVIDERS, disabled)
    return b


def test_weights_split_within_a_statistical_bound() -> None:
    b = board(ChannelSpec("a", weight=3), ChannelSpec("b", weight=1))
    picks = [b.pick("m", "openai", 0) for _ in range(10_000)]
    share = sum(1 for p in picks if p is not None and p.provider == "a")
    # 7 500 expected; sd √(10 000 × 0.75 × 0.25) ≈ 43: ±5 sd
    assert 7_284 <= share <= 7_716


def test_lower_priority_only_when_no_priority_0_channel_is_available() -> None:
    b = board(ChannelSpec("a"), ChannelSpec("b", priority=1))
    assert {b.pick("m", "openai", 0).id for _ in range(50)} == {"m/a"}  # type: ignore[union-attr]
    a = b.channels["m/a"]
    assert b.pick("m", "openai", 0, [a]).id == "m/b"  # type: ignore[union-attr]
    a.disabled = True
    assert b.pick("m", "openai", 0).id == "m/b"  # type: ignore[union-attr]
    assert b.pick("m", "openai", 0, [b.channels["m/b"]]) is None


def test_a_channel_serves_only_the_protocols_of_its_provider() -> None:
    b = board(ChannelSpec("a"), ChannelSpec("c", priority=1))
    assert [c.id for c in b.route("m", "openai")] == ["m/a"]
    assert [c.id for c in b.route("m", "anthropic")] == ["m/c"]


def test_a_key_pool_is_one_channel_per_key_used_in_turn() -> None:
    b = board(ChannelSpec("pool"))
    picks = [b.pick("m", "openai", 0) for _ in range(4)]
    assert [p.id for p in picks if p] == ["m/pool#1", "m/pool#2", "m/pool#3", "m/pool#1"]
    assert [p.upstream for p in picks if p][:3] == ["pool#1", "pool#2", "pool#3"]
    b.channels["m/pool#2"].disabled = True
    assert [b.pick("m", "openai", 0).id for _ in range(3)] == [  # type: ignore[union-attr]
        "m/pool#3", "m/pool#1", "m/pool#3"]


def test_breaker_opens_after_consecutive_failures_then_probes_once() -> None:
    b = board(ChannelSpec("a"), ChannelSpec("b", priority=1))
    a = b.channels["m/a"]
    b.failed(a, 5, 1_000)
    b.succeeded(a, 5)  # a success resets the count
    b.failed(a, 5, 1_000)
    assert a.state(1_000) == "closed"
    b.failed(a, 5, 2_000)
    assert (a.state(2_000), a.available(31_999)) == ("open", False)
    assert a.state(32_000) == "half_open" and a.available(32_000)
    b.begin(a, 32_000)  # the probe is in flight: nobody else gets the channel
    assert not a.available(32_001) and b.pick("m", "openai", 32_001).id == "m/b"  # type: ignore[union-attr]
    b.failed(a, 5, 32_500)  # the probe failed: open for another cooldown
    assert a.state(62_499) == "open" and a.state(62_500) == "half_open"
    b.begin(a, 62_500)
    b.succeeded(a, 5)
    assert a.state(62_501) == "closed" and a.failures == 0


def test_retry_after_opens_at_once_for_that_long() -> None:
    b = board(ChannelSpec("a"))
    a = b.channels["m/a"]
    b.failed(a, 5, 0, retry_after_ms=120_000)
    assert a.state(119_999) == "open" and a.state(120_000) == "half_open"
    assert b.retry_after_ms("m", "openai", 100_000) == 20_000


def test_state_survives_a_catalog_refresh_and_disabled_comes_from_the_store() -> None:
    b = board(ChannelSpec("a"), ChannelSpec("b"))
    b.failed(b.channels["m/a"], 5, 0, retry_after_ms=10_000)
    spec = ItemSpec(upstream_model="m-up", channels=(ChannelSpec("a"), ChannelSpec("b")))
    b.configure([("m", spec, "a")], PROVIDERS, {"m/b"})
    assert b.channels["m/a"].state(0) == "open"
    assert b.channels["m/b"].state(0) == "disabled"


def test_a_refresh_keeps_each_channel_object_and_the_pools_turn() -> None:
    """A request in flight during a catalog refresh still reports to the live channel, and
    its tried channels stay tried; a key pool goes on where it was."""
    b = board(ChannelSpec("pool"), ChannelSpec("a", priority=1))
    first = b.pick("m", "openai", 0)
    assert first is not None and first.id == "m/pool#1"
    spec = ItemSpec(upstream_model="m-up", channels=(ChannelSpec("pool"),
                                                     ChannelSpec("a", priority=1)))
    b.configure([("m", spec, "pool")], PROVIDERS)
    assert b.channels["m/pool#1"] is first
    assert b.pick("m", "openai", 0).id == "m/pool#2"  # type: ignore[union-attr]
    tried = [b.channels[f"m/pool#{n}"] for n in (1, 2, 3)]
    assert b.pick("m", "openai", 0, tried).id == "m/a"  # type: ignore[union-attr]


def test_retry_statuses_parse() -> None:
    assert parse_statuses("408, 429,5xx") == frozenset({408, 429, *range(500, 600)})


def test_items_without_channels_are_one_channel_per_provider() -> None:
    b = Board()
    spec = ItemSpec(upstream_model="x", providers={"openai": "a", "anthropic": "c"})
    b.configure([("x", spec, "a"), ("e", ItemSpec(path="/p", method="GET"), "b")], PROVIDERS)
    assert [c.id for c in b.route("x", "openai")] == ["x/a"]
    assert [c.id for c in b.route("x", "anthropic")] == ["x/c"]
    assert [c.id for c in b.route("e", "")] == ["e/b"]


CATALOG = """
providers:
  a: {kind: openai, base_url: "http://a.example/v1", api_key_envs: [K1, K2]}
  b: {kind: openai, base_url: "http://b.example/v1"}
models:
  - id: gpt-x
    price: {input: "2.5", output: "10"}
    cost: {input: "2.0", output: "8.0"}
    channels:
      - {provider: a, upstream_model: gpt-x-2025-08, weight: 3}
      - {provider: b, priority: 1, cost: {input: "2.2", output: "9"}}
"""


def test_catalog_channels_shape() -> None:
    (model,) = parse_catalog(CATALOG).listings
    assert model.provider == "a"
    assert model.spec.channels == (
        ChannelSpec("a", "gpt-x-2025-08", 3, 0, None),
        ChannelSpec("b", None, 1, 1, TokenPrice(Decimal("2.2"), Decimal("9"))))
    assert model.spec.cost == TokenPrice(Decimal("2.0"), Decimal("8.0"))
    assert ItemSpec.from_dict(model.spec.as_dict()) == model.spec


@pytest.mark.parametrize(("channels", "problem"), [
    ("[{provider: nope}]", "channels[0].provider: unknown provider 'nope'"),
    ("[{provider: a, weight: 0}]", "channels[0].weight: must be a positive integer"),
    ("[{provider: a, priority: -1}]", "channels[0].priority: must be an integer >= 0"),
    ("[{provider: a}, {provider: a}]", "channels[1].provider: provider 'a' is already"),
    ("[{provider: a, colour: red}]", "channels[0].colour: unknown field"),
    ("[{provider: a, cost: {input: '1'}}]", "channels[0].cost.output: missing"),
    ("[]", "channels: must be a list"),
])
def test_catalog_channel_problems_are_reported(channels: str, problem: str) -> None:
    text = CATALOG.split("models:")[0] + f"""models:
  - id: m
    price: {{input: "1", output: "2"}}
    channels: {channels}
"""
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_channels_and_provider_are_exclusive() -> None:
    text = CATALOG.split("models:")[0] + """models:
  - id: m
    provider: b
    price: {input: "1", output: "2"}
    channels: [{provider: a}]
"""
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text)
    assert any("not both" in p for p in caught.value.problems)
