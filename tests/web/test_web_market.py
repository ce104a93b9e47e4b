"""The public marketplace pages on SQLite and PostgreSQL, with the demo catalog
(``examples/catalog.yaml``): every item with its billing type, its price as people read it,
the price for a group after ratios, search and filters (a plain GET form), a page per item
with copy-paste examples, and an HTML 404 for anything unknown.

Expected strings are written out by hand from the catalog file: sandbox-chat costs 0.15 /
0.60 / cache read 0.075 USD per 1M tokens and sets its own ratio 0.7 for ``vip``; every other
item gets the ``vip`` group's 0.8 (sandbox-claude's 1-hour cache write: 6.00 × 0.8 = 4.80;
sandbox-image's 1792x1024 image: 0.08 × 0.8 = 0.064). The sandbox provider speaks both
protocol families, so a token model is sold on the four OpenAI token routes and
/v1/messages, unless the catalog narrows it (sandbox-embed: /v1/embeddings only); an image
model on /v1/images/generations.
"""

from __future__ import annotations

import html
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tollway import clock
from tollway.app import create_app
from tollway.pricing.catalog import load_catalog
from tollway.store.catalog import apply_catalog
from tollway.store.db import Database

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette 1.x prefers httpx2 for its test client
    from starlette.testclient import TestClient

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"

LIST_PRICES = {
    "sandbox-chat": ("Per token", ["$0.150000 / 1M input tokens",
                                   "$0.600000 / 1M output tokens",
                                   "$0.075000 / 1M cached input tokens"]),
    "sandbox-reasoner": ("Per token", ["$2.500000 / 1M input tokens",
                                       "$10.000000 / 1M output tokens",
                                       "$1.250000 / 1M cached input tokens",
                                       "$3.125000 / 1M cache-write tokens"]),
    "sandbox-embed": ("Per token", ["$0.020000 / 1M input tokens",
                                    "$0.000000 / 1M output tokens"]),
    "sandbox-claude": ("Per token", ["$3.000000 / 1M input tokens",
                                     "$15.000000 / 1M output tokens",
                                     "$0.300000 / 1M cached input tokens",
                                     "$3.750000 / 1M cache-write tokens",
                                     "$6.000000 / 1M cache-write (1h) tokens"]),
    "sandbox-image": ("Per image", ["$0.040000 / per image",
                                    "$0.040000 / per image (1024x1024)",
                                    "$0.080000 / per image (1792x1024)"]),
    "web-search": ("Per call", ["$0.002000 / per call"]),
    "stock-quote": ("Per call", ["$0.000500 / per call"]),
    "scholar-search": ("Per call", ["$0.020000 / per call"]),
}
VIP_PRICES = {
    "sandbox-chat": ["$0.105000 / 1M input tokens", "$0.420000 / 1M output tokens",
                     "$0.052500 / 1M cached input tokens"],
    "sandbox-reasoner": ["$2.000000 / 1M input tokens", "$8.000000 / 1M output tokens",
                         "$1.000000 / 1M cached input tokens",
                         "$2.500000 / 1M cache-write tokens"],
    "sandbox-embed": ["$0.016000 / 1M input tokens", "$0.000000 / 1M output tokens"],
    "sandbox-claude": ["$2.400000 / 1M input tokens", "$12.000000 / 1M output tokens",
                       "$0.240000 / 1M cached input tokens",
                       "$3.000000 / 1M cache-write tokens",
                       "$4.800000 / 1M cache-write (1h) tokens"],
    "sandbox-image": ["$0.032000 / per image", "$0.032000 / per image (1024x1024)",
                      "$0.064000 / per image (1792x1024)"],
    "web-search": ["$0.001600 / per call"],
    "stock-quote": ["$0.000400 / per call"],
    "scholar-search": ["$0.016000 / per call"],
}
ALL_TOKEN_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                    "/v1/responses", "/v1/messages"]
ROUTES = {
    "sandbox-chat": ALL_TOKEN_ROUTES,
    "sandbox-reasoner": ALL_TOKEN_ROUTES,
    "sandbox-claude": ALL_TOKEN_ROUTES,
    "sandbox-embed": ["/v1/embeddings"],
    "sandbox-image": ["/v1/images/generations"],
}
ENDPOINTS = {
    "web-search": ("Web search", "GET", "/apis/v1/search/web"),
    "stock-quote": ("Stock quote", "GET", "/apis/v1/finance/quote/{symbol}"),
    "scholar-search": ("Scholar search", "POST", "/apis/v1/scholar/search"),
}


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    db = Database(db_url)
    with db.write() as conn:
        apply_catalog(conn, load_catalog(CATALOG), now_ms=clock.now_ms())
    db.dispose()
    with TestClient(create_app(database_url=db_url, admin_token="adm-market")) as c:
        yield c


def _texts(fragment: str, pattern: str) -> list[str]:
    return [html.unescape(re.sub(r"<[^>]+>", "", m)).strip()
            for m in re.findall(pattern, fragment, re.S)]


def rows(page: str) -> dict[str, dict[str, object]]:
    """The marketplace table: per item, its cells as the reader sees them."""
    found: dict[str, dict[str, object]] = {}
    for item_id, row in re.findall(r'<tr data-item="([^"]+)">(.*?)</tr>', page, re.S):
        list_cell, group_cell = re.findall(r'<td class="price[^"]*">(.*?)</td>', row, re.S)
        found[html.unescape(item_id)] = {
            "billing": _texts(row, r'<span class="badge[^"]*">(.*?)</span>')[0],
            "provider": _texts(row, r"</span></td>\s*<td>(.*?)</td>")[0],
            "list": _texts(list_cell, r"<li>(.*?)</li>"),
            "group": _texts(group_cell, r"<li>(.*?)</li>"),
            "endpoint": _texts(row, r'<div class="endpoint">(.*?)</div>'),
            "routes": _texts(row, r'<code class="route">POST (.*?)</code>'),
        }
    return found


def page(client: TestClient, path: str, status: int = 200) -> str:
    response = client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "Traceback" not in response.text
    return response.text


def test_lists_every_item_with_billing_type_price_and_provider(client: TestClient) -> None:
    listed = rows(page(client, "/"))
    assert set(listed) == set(LIST_PRICES)
    for item_id, (billing, prices) in LIST_PRICES.items():
        assert listed[item_id]["billing"] == billing, item_id
        assert listed[item_id]["provider"] == "sandbox"
        assert listed[item_id]["list"] == prices, item_id
        assert listed[item_id]["group"] == prices, item_id  # the default group's ratio is 1
    for item_id, (name, method, path) in ENDPOINTS.items():
        (endpoint,) = listed[item_id]["endpoint"]  # type: ignore[misc]
        assert endpoint.split() == [*name.split(), method, path]
        assert listed[item_id]["routes"] == []
    for item_id, routes in ROUTES.items():
        assert listed[item_id]["endpoint"] == []
        assert listed[item_id]["routes"] == routes, item_id


def test_group_selector_shows_prices_after_ratios(client: TestClient) -> None:
    text = page(client, "/?group=vip")
    listed = rows(text)
    for item_id, prices in VIP_PRICES.items():
        assert listed[item_id]["group"] == prices, item_id
        assert listed[item_id]["list"] == LIST_PRICES[item_id][1]
    assert '<option value="vip" selected>' in text
    chat_row = text.split('data-item="sandbox-chat"')[1].split("</tr>")[0]
    assert "×0.7 (item's own ratio)" in chat_row
    assert "×0.8" in text.split('data-item="web-search"')[1].split("</tr>")[0]
    missing = page(client, "/?group=platinum", 404)
    assert "there is no group &#39;platinum&#39;" in missing


@pytest.mark.parametrize(("query", "expected"), [
    ("q=quote", {"stock-quote"}),
    ("q=SCHOLAR", {"scholar-search"}),
    ("q=sandbox-chat", {"sandbox-chat"}),
    ("q=sandbox+messages", {"sandbox-chat", "sandbox-reasoner", "sandbox-claude"}),
    ("q=%2Fv1%2Fimages", {"sandbox-image"}),
    ("q=embeddings", {"sandbox-chat", "sandbox-reasoner", "sandbox-claude", "sandbox-embed"}),
    ("q=%2Fapis%2Fv1%2Fsearch", {"web-search"}),
    ("q=POST", {"scholar-search"}),
    ("q=nothing-like-this", set()),
    ("billing_type=per_call", {"web-search", "stock-quote", "scholar-search", "sandbox-image"}),
    ("billing_type=token", {"sandbox-chat", "sandbox-reasoner", "sandbox-embed",
                            "sandbox-claude"}),
    ("billing_type=token&q=reason", {"sandbox-reasoner"}),
    ("provider=sandbox", set(LIST_PRICES)),
    ("provider=elsewhere", set()),
    ("q=&billing_type=&provider=&group=", set(LIST_PRICES)),
])
def test_search_and_filters(client: TestClient, query: str, expected: set[str]) -> None:
    text = page(client, "/?" + query)
    assert set(rows(text)) == expected
    assert f"{len(expected)} of 8 items" in text
    if not expected:
        assert "Nothing matches." in text


def test_the_filter_form_is_a_plain_get_form(client: TestClient) -> None:
    text = page(client, "/?q=quote&billing_type=per_call&provider=sandbox")
    form = re.search(r'<form method="get" action="/"[^>]*>(.*?)</form>', text, re.S)
    assert form is not None
    body = form.group(1)
    assert 'name="q" value="quote"' in body
    assert '<option value="per_call" selected>' in body
    assert '<option value="sandbox" selected>' in body
    assert set(re.findall(r'name="(\w+)"', body)) == {"q", "billing_type", "provider", "group"}


def test_item_page_for_a_model_has_curl_and_openai_examples(client: TestClient) -> None:
    text = html.unescape(page(client, "/market/sandbox-chat?group=vip"))
    assert "<h1>sandbox-chat</h1>" in text
    for line in LIST_PRICES["sandbox-chat"][1] + VIP_PRICES["sandbox-chat"]:
        assert line in text
    assert "curl http://testserver/v1/chat/completions" in text
    assert '"model": "sandbox-chat"' in text
    assert 'OpenAI(base_url="http://testserver/v1", api_key=os.environ["TOLLWAY_API_KEY"])' \
        in text
    assert "model='sandbox-chat'" in text
    assert '<tr class="selected" aria-current="true">\n      <th scope="row">vip</th>' in text


def _examples(text: str) -> dict[str, str]:
    return {title: code for title, code in re.findall(
        r"<h3>(.*?)</h3>\s*<pre><code>(.*?)</code></pre>", text, re.S)}


def _routes(text: str) -> list[str]:
    body = re.search(r'<ul class="plain routes" id="routes">(.*?)</ul>', text, re.S)
    assert body is not None
    return re.findall(r'<code class="route">POST (.*?)</code>', body.group(1))


def test_item_page_for_a_messages_model_has_prices_routes_and_an_anthropic_example(
        client: TestClient) -> None:
    text = html.unescape(page(client, "/market/sandbox-claude?group=vip"))
    for line in LIST_PRICES["sandbox-claude"][1] + VIP_PRICES["sandbox-claude"]:
        assert line in text
    assert _routes(text) == ALL_TOKEN_ROUTES
    shown = _examples(text)
    assert list(shown) == ["curl", "Python (openai)", "curl (Anthropic messages)",
                           "Python (anthropic)"]
    assert shown["curl (Anthropic messages)"] == (
        "curl http://testserver/v1/messages \\\n"
        '  -H "x-api-key: $TOLLWAY_API_KEY" \\\n'
        '  -H "anthropic-version: 2023-06-01" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        """  -d '{"model": "sandbox-claude", "max_tokens": 1024, "messages": """
        """[{"role": "user", "content": "Hello!"}]}'""")
    anthropic_code = shown["Python (anthropic)"]
    assert ('anthropic.Anthropic(base_url="http://testserver", '
            'api_key=os.environ["TOLLWAY_API_KEY"])') in anthropic_code
    assert "model='sandbox-claude'" in anthropic_code and "max_tokens=1024" in anthropic_code
    compile(anthropic_code, "example.py", "exec")


def test_item_page_for_an_image_model_has_per_size_prices_and_an_images_example(
        client: TestClient) -> None:
    text = html.unescape(page(client, "/market/sandbox-image?group=vip"))
    for line in LIST_PRICES["sandbox-image"][1] + VIP_PRICES["sandbox-image"]:
        assert line in text
    assert "Per image" in text and "Max output tokens" not in text
    assert _routes(text) == ["/v1/images/generations"]
    shown = _examples(text)
    assert list(shown) == ["curl (images)", "Python (openai images)"]
    assert shown["curl (images)"].startswith("curl http://testserver/v1/images/generations")
    assert '"size": "1024x1024"' in shown["curl (images)"]
    code = shown["Python (openai images)"]
    assert "client.images.generate(" in code and "size='1024x1024'" in code
    compile(code, "example.py", "exec")


def test_a_model_narrowed_to_embeddings_shows_only_that_route(client: TestClient) -> None:
    text = html.unescape(page(client, "/market/sandbox-embed"))
    assert _routes(text) == ["/v1/embeddings"]
    shown = _examples(text)
    assert list(shown) == ["curl", "Python (openai)"]
    assert shown["curl"].startswith("curl http://testserver/v1/embeddings")
    assert "client.embeddings.create(" in shown["Python (openai)"]
    compile(shown["Python (openai)"], "example.py", "exec")


def test_item_page_for_an_endpoint_uses_its_method_path_and_parameters(
        client: TestClient) -> None:
    text = html.unescape(page(client, "/market/stock-quote"))
    assert "GET /apis/v1/finance/quote/{symbol}" in text
    assert "$0.000500 / per call" in text and "$0.000400 / per call" in text
    assert 'SYMBOL="example"  # path parameter {symbol}' in text
    assert 'curl -X GET "http://testserver/apis/v1/finance/quote/$SYMBOL"' in text
    assert 'url = f"http://testserver/apis/v1/finance/quote/{symbol}"' in text
    assert "httpx.request('GET', url, params={}, headers=headers)" in text
    post = html.unescape(page(client, "/market/scholar-search"))
    assert 'curl -X POST "http://testserver/apis/v1/scholar/search"' in post
    assert "-d '{}'" in post
    assert "httpx.request('POST', url, json={}, headers=headers)" in post


def test_examples_work_as_written(client: TestClient) -> None:
    """The Python example for a per-call endpoint is valid Python addressing the real route."""
    text = html.unescape(page(client, "/market/stock-quote"))
    code = re.findall(r"<h3>Python \(httpx\)</h3>\s*<pre><code>(.*?)</code></pre>", text, re.S)[0]
    compile(code, "example.py", "exec")
    chat = html.unescape(page(client, "/market/sandbox-chat"))
    code = re.findall(r"<h3>Python \(openai\)</h3>\s*<pre><code>(.*?)</code></pre>", chat,
                      re.S)[0]
    compile(code, "example.py", "exec")


@pytest.mark.parametrize("path", ["/market/nope", "/market/sandbox-chat/extra",
                                  "/market/%00", "/market/" + "x" * 5000, "/market/"])
def test_unknown_items_are_an_html_404(client: TestClient, path: str) -> None:
    text = page(client, path, 404)
    assert "<!doctype html>" in text


def test_the_json_listing_is_unchanged_by_display_groups(client: TestClient) -> None:
    body = client.get("/v1/marketplace").json()
    assert all("group_display" not in item for item in body["data"])
