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
from tollway.ledger.ledger import now_ms
from tollway.store.catalog import group_ratios
from tollway.web.context import Context
from tollway.web.pages import error_page, render

BILLING_TYPES = {"token": "Per token", "per_call": "Per call"}
_PARAM = re.compile(r"\{([^}]*)\}")


def _matches(item: dict[str, Any], query: str) -> bool:
    words = [item["id"], item["provider"], item["billing_type"], item.get("name") or "",
             item.get("path") or "", item.get("method") or ""]
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
    items = data["data"]
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
    item = data["data"][0]
    if group not in item["group_display"]:
        group = "default"
    base = str(request.base_url).rstrip("/")
    return await render(request, "market/item.html", {
        "item": item, "group": group, "billing_types": BILLING_TYPES,
        "examples": examples(item, base)})


def examples(item: dict[str, Any], base: str) -> list[tuple[str, str]]:
    """Copy-paste examples for an item, as (title, code), addressed to ``base``."""
    if item["billing_type"] == "token":
        return _model_examples(item["id"], base)
    return _endpoint_examples(item["method"], item["path"], base)


def _model_examples(model: str, base: str) -> list[tuple[str, str]]:
    # catalog ids never hold a quote, so the JSON is safe inside shell single quotes
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    curl = (f"curl {base}/v1/chat/completions \\\n"
            '  -H "Authorization: Bearer $TOLLWAY_API_KEY" \\\n'
            '  -H "Content-Type: application/json" \\\n'
            f"  -d '{body}'")
    python = ("import os\n\nfrom openai import OpenAI\n\n"
              f'client = OpenAI(base_url="{base}/v1", '
              'api_key=os.environ["TOLLWAY_API_KEY"])\n'
              "response = client.chat.completions.create(\n"
              f"    model={model!r},\n"
              '    messages=[{"role": "user", "content": "Hello!"}],\n'
              ")\n"
              "print(response.choices[0].message.content)\n"
              "print(response.usage)  # what the request is billed on")
    return [("curl", curl), ("Python (openai)", python)]


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
