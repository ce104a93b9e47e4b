"""The public marketplace pages: every model and data API with its price, and a page per item
with copy-paste examples.

Prices come from ``billing.marketplace.listing`` (the same data as ``GET /v1/marketplace``),
so the page and the API can never disagree. Search, filters and the group selector are a
plain GET form: they work without JavaScript and every view has a URL.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tollway.billing.marketplace import listing
from tollway.clock import now_ms
from tollway.runtime.context import Context
from tollway.store.catalog import group_ratios
from tollway.web.pages import error_page, render

BILLING_TYPES = {"token": "Per token", "per_call": "Per call or image"}
_PARAM = re.compile(r"\{([^}]*)\}")
#: The OpenAI-protocol route a model's first example uses, in order of preference.
_OPENAI_EXAMPLE_ROUTES = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses",
                          "/v1/completions")


def _kind(item: dict[str, Any]) -> dict[str, Any]:
    """Adds what the pages show about an item's kind: ``endpoint`` (a data API, per call),
    ``image`` (an image model, per image) or ``model`` (per token), and its badge."""
    kind = ("endpoint" if "path" in item else "model" if item["billing_type"] == "token"
            else "image")
    item["kind"] = kind
    item["badge"] = {"endpoint": "Per call", "image": "Per image", "model": "Per token"}[kind]
    return item


def _matches(item: dict[str, Any], query: str) -> bool:
    words = [item["id"], item["provider"], item["billing_type"], item.get("name") or "",
             item.get("path") or "", item.get("method") or "", *item.get("routes", ())]
    text = " ".join(words).lower()
    return all(part in text for part in query.lower().split())


async def marketplace_page(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    q = request.query_params
    query = (q.get("q") or "").strip()[:200]
    billing_type = q.get("billing_type") or ""
    provider = q.get("provider") or ""
    group = q.get("group") or "default"
    data = await ctx.read(lambda conn: listing(conn, now_ms=now_ms(), display_groups=[group]))
    if group not in data["groups"]:
        return await error_page(request, 404, f"there is no group {group!r}; choose one of "
                                f"{', '.join(data['groups'])}")
    items = [_kind(item) for item in data["data"]]
    providers = sorted({item["provider"] for item in items})
    shown = [item for item in items
             if (not query or _matches(item, query))
             and (not billing_type or item["billing_type"] == billing_type)
             and (not provider or item["provider"] == provider)]
    return await render(request, "market/index.html", {
        "items": shown, "total": len(items), "groups": data["groups"], "group": group,
        "providers": providers, "billing_types": BILLING_TYPES, "q": query,
        "billing_type": billing_type, "provider": provider})


async def item_page(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    item_id = request.path_params["item_id"]
    group = request.query_params.get("group") or "default"

    def load(conn: Connection) -> dict[str, Any]:
        return listing(conn, now_ms=now_ms(), item_id=item_id,
                       display_groups=list(group_ratios(conn)))

    data = await ctx.read(load) if "\x00" not in item_id else {"data": []}
    if not data["data"]:
        return await error_page(request, 404, f"nothing in the marketplace is called "
                                f"{item_id!r}")
    item = _kind(data["data"][0])
    if group not in item["group_display"]:
        group = "default"
    base = str(request.base_url).rstrip("/")
    return await render(request, "market/item.html", {
        "item": item, "group": group, "billing_types": BILLING_TYPES,
        "examples": examples(item, base)})


def examples(item: dict[str, Any], base: str) -> list[tuple[str, str]]:
    """Copy-paste examples for an item, as (title, code), addressed to ``base``: for a model,
    one per protocol it is sold on (OpenAI, Anthropic messages, images)."""
    if item["kind"] == "endpoint":
        return _endpoint_examples(item["method"], item["path"], base)
    routes = item.get("routes") or []
    found: list[tuple[str, str]] = []
    openai_route = next((r for r in _OPENAI_EXAMPLE_ROUTES if r in routes), None)
    if openai_route is not None:
        found += _openai_examples(item["id"], openai_route, base)
    if "/v1/messages" in routes:
        found += _messages_examples(item["id"], min(1024, item.get("max_output_tokens") or 1024),
                                    base)
    if "/v1/images/generations" in routes:
        sizes = list(item["price"].get("per_size") or {})
        found += _image_examples(item["id"], sizes[0] if sizes else None, base)
    return found


def _curl(url: str, headers: list[str], body: dict[str, Any]) -> str:
    # catalog ids never hold a quote, so the JSON is safe inside shell single quotes
    lines = [f"curl {url} \\"] + [f'  -H "{h}" \\' for h in headers]
    return "\n".join(lines + ['  -H "Content-Type: application/json" \\',
                              f"  -d '{json.dumps(body)}'"])


_BEARER = "Authorization: Bearer $TOLLWAY_API_KEY"
_OPENAI_CLIENT = ("import os\n\nfrom openai import OpenAI\n\n"
                  'client = OpenAI(base_url="{base}/v1", '
                  'api_key=os.environ["TOLLWAY_API_KEY"])\n')
_HELLO = [{"role": "user", "content": "Hello!"}]


def _openai_examples(model: str, route: str, base: str) -> list[tuple[str, str]]:
    if route == "/v1/embeddings":
        body: dict[str, Any] = {"model": model, "input": "Hello!"}
        call = ("response = client.embeddings.create(\n"
                f'    model={model!r},\n    input="Hello!",\n)\n'
                "print(len(response.data[0].embedding))\n")
    elif route == "/v1/responses":
        body = {"model": model, "input": "Hello!"}
        call = ("response = client.responses.create(\n"
                f'    model={model!r},\n    input="Hello!",\n)\n'
                "print(response.output_text)\n")
    elif route == "/v1/completions":
        body = {"model": model, "prompt": "Hello!"}
        call = ("response = client.completions.create(\n"
                f'    model={model!r},\n    prompt="Hello!",\n)\n'
                "print(response.choices[0].text)\n")
    else:
        body = {"model": model, "messages": _HELLO}
        call = ("response = client.chat.completions.create(\n"
                f"    model={model!r},\n"
                '    messages=[{"role": "user", "content": "Hello!"}],\n'
                ")\n"
                "print(response.choices[0].message.content)\n")
    python = (_OPENAI_CLIENT.format(base=base) + call
              + "print(response.usage)  # what the request is billed on")
    return [("curl", _curl(f"{base}{route}", [_BEARER], body)), ("Python (openai)", python)]


def _messages_examples(model: str, max_tokens: int, base: str) -> list[tuple[str, str]]:
    body = {"model": model, "max_tokens": max_tokens, "messages": _HELLO}
    curl = _curl(f"{base}/v1/messages",
                 ["x-api-key: $TOLLWAY_API_KEY", "anthropic-version: 2023-06-01"], body)
    python = ("import os\n\nimport anthropic\n\n"
              f'client = anthropic.Anthropic(base_url="{base}", '
              'api_key=os.environ["TOLLWAY_API_KEY"])\n'
              "message = client.messages.create(\n"
              f"    model={model!r},\n"
              f"    max_tokens={max_tokens},\n"
              '    messages=[{"role": "user", "content": "Hello!"}],\n'
              ")\n"
              "print(message.content[0].text)\n"
              "print(message.usage)  # what the request is billed on")
    return [("curl (Anthropic messages)", curl), ("Python (anthropic)", python)]


def _image_examples(model: str, size: str | None, base: str) -> list[tuple[str, str]]:
    body: dict[str, Any] = {"model": model, "prompt": "a lighthouse at dusk", "n": 1}
    sized = ""
    if size is not None:
        body["size"] = size
        sized = f"    size={size!r},\n"
    python = (_OPENAI_CLIENT.format(base=base)
              + "response = client.images.generate(\n"
              f'    model={model!r},\n    prompt="a lighthouse at dusk",\n    n=1,\n'
              + sized + ")\n"
              "print(response.data[0])  # billed per image returned")
    return [("curl (images)", _curl(f"{base}/v1/images/generations", [_BEARER], body)),
            ("Python (openai images)", python)]


def _endpoint_examples(method: str, path: str, base: str) -> list[tuple[str, str]]:
    params = _PARAM.findall(path)
    shell_path = _PARAM.sub(lambda m: "$" + m.group(1).upper(), path)
    py_path = _PARAM.sub(lambda m: "{" + m.group(1) + "}", path)
    sends_body = method in ("POST", "PUT", "PATCH")
    curl_lines = [f'{p.upper()}="example"  # path parameter {{{p}}}' for p in params]
    curl_lines.append(f'curl -X {method} "{base}{shell_path}" \\')
    if sends_body:
        curl_lines.append('  -H "Authorization: Bearer $TOLLWAY_API_KEY" \\')
        curl_lines.append('  -H "Content-Type: application/json" \\')
        curl_lines.append("  -d '{}'  # the API's JSON body")
    else:
        curl_lines.append('  -H "Authorization: Bearer $TOLLWAY_API_KEY"')
    py = ["import os", "", "import httpx", ""]
    py += [f'{p} = "example"  # path parameter' for p in params]
    prefix = "f" if params else ""
    py.append(f'url = {prefix}"{base}{py_path}"')
    py.append('headers = {"Authorization": f"Bearer {os.environ[\'TOLLWAY_API_KEY\']}"}')
    extra = "json={}, " if sends_body else "params={}, "
    py.append(f"response = httpx.request({method!r}, url, {extra}headers=headers)")
    py.append("response.raise_for_status()")
    py.append("print(response.json())")
    return [("curl", "\n".join(curl_lines)), ("Python (httpx)", "\n".join(py))]


market_routes = [
    Route("/", marketplace_page, methods=["GET"]),
    Route("/market/{item_id:path}", item_page, methods=["GET"]),
]
