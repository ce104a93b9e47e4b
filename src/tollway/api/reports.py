"""Usage log, summaries and statements over HTTP, for a customer (their own account, by API
key) and for the operator (any account, admin token). One set of handlers serves both: the
caller's scope decides which account a query may touch."""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from tollway.billing import keys
from tollway.billing.reports import (
    STATEMENT_LINES,
    month_bounds,
    operator_view,
    record_view,
    statement_csv,
    statement_view,
    summary_view,
)
from tollway.clock import now_ms
from tollway.errors import InvalidRequest, NotFound
from tollway.money import format_usd
from tollway.runtime.context import Context
from tollway.runtime.http import bearer
from tollway.runtime.queries import Scope, log_filter, query_int, query_time
from tollway.store import accounts as account_store
from tollway.store import reports as store
from tollway.store.reports import DAY_MS, HOUR_MS


async def customer_scope(request: Request, ctx: Context) -> int:
    secret = bearer(request)
    record = await ctx.read(lambda conn: keys.authenticate(conn, secret, now_ms=now_ms()))
    return record.account_id


def usage_list(scope: Scope, *, operator: bool = False
               ) -> Callable[[Request], Awaitable[Response]]:
    view = operator_view if operator else record_view

    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await scope(request, ctx)
        where = log_filter(request, account_id)
        limit = query_int(request, "limit", default=50, high=1000) or 50
        cursor = request.query_params.get("cursor") or None
        rows, next_cursor = await ctx.read(
            lambda conn: store.usage_page(conn, where, limit=limit, cursor=cursor))
        return JSONResponse({"object": "list", "data": [view(r) for r in rows],
                             "next_cursor": next_cursor, "has_more": next_cursor is not None})
    return endpoint


def usage_one(scope: Scope, *, operator: bool = False
              ) -> Callable[[Request], Awaitable[Response]]:
    view = operator_view if operator else record_view

    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await scope(request, ctx)
        request_id = request.path_params["request_id"]
        row = await ctx.read(lambda conn: store.get_record(conn, request_id,
                                                           account_id=account_id))
        if row is None:  # another account's record reads exactly like a missing one
            raise NotFound(f"no usage record {request_id!r}")
        return JSONResponse(view(row))
    return endpoint


def _period(request: Request) -> tuple[int, int]:
    """Whole UTC hours: the rollups' grain. Start rounds down, end up; default 30 days."""
    end = query_time(request, "end") or now_ms()
    start = query_time(request, "start") or end - 30 * DAY_MS
    if start >= end:
        raise InvalidRequest("start must be before end")
    return start - start % HOUR_MS, end + (-end % HOUR_MS)


def summary(scope: Scope) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await scope(request, ctx)
        start, end = _period(request)
        group_by = [g for g in request.query_params.get("group_by", "").split(",") if g]

        def load(conn: Connection) -> dict[str, Any]:
            rows, totals = store.summary(conn, account_id=account_id, start_ms=start,
                                         end_ms=end, group_by=group_by)
            view = summary_view(rows, totals, start_ms=start, end_ms=end)
            if account_id is not None:
                account = account_store.get_account(conn, account_id)
                view["account"] = {"id": account.id,
                                   "balance_usd": format_usd(account.balance_nano),
                                   "held_usd": format_usd(account.held_nano),
                                   "available_usd": format_usd(account.available_nano)}
            return view

        return JSONResponse(await ctx.read(load))
    return endpoint


def statement(scope: Scope) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await scope(request, ctx)
        if account_id is None:
            raise InvalidRequest("a statement is for one account")
        month = request.query_params.get("month") or ""
        start, end = month_bounds(month)
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "csv", "html"):
            raise InvalidRequest("format must be json, csv or html")

        def load(conn: Connection) -> dict[str, Any]:
            account = account_store.get_account(conn, account_id)
            return statement_view(account, month,
                                  store.statement(conn, account_id, start_ms=start, end_ms=end))

        view = await ctx.read(load)
        if fmt == "csv":
            return Response(statement_csv(view), media_type="text/csv")
        if fmt == "html":
            return HTMLResponse(statement_html(view))
        return JSONResponse(view)
    return endpoint


def statement_html(view: dict[str, Any]) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(p['product'])}</td><td>{e(p['billing_type'])}</td>"
        f"<td class=n>{p['requests']}</td><td class=n>{e(p['cost_usd'])}</td></tr>"
        for p in view["charges_by_product"])
    lines = "\n".join(f"<tr><th>{e(label.capitalize())}</th><td class=n>{e(view[key])}</td></tr>"
                      for label, key in STATEMENT_LINES)
    account = view["account"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Statement {e(view['month'])} — {e(account['name'])}</title>
<style>body{{font:15px/1.4 system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;width:100%;margin:1rem 0}}td,th{{padding:.3rem .5rem;
border-bottom:1px solid #ddd;text-align:left}}.n{{text-align:right;font-variant-numeric:
tabular-nums}}@media print{{body{{margin:0}}}}</style></head><body>
<h1>Statement for {e(view['month'])}</h1>
<p>Account {account['id']} — {e(account['name'])} (group {e(account['group'])})</p>
<table aria-label="balance"><tbody>
{lines}
</tbody></table>
<p>{e(view['reconciliation'])} USD</p>
<p>Promotional credit: {e(view['promotional_reconciliation'])} USD</p>
<h2>Charges by product</h2>
<table><thead><tr><th>Product</th><th>Billing</th><th class=n>Requests</th>
<th class=n>Cost (USD)</th></tr></thead><tbody>{rows}</tbody></table>
</body></html>"""
