"""The customer console: overview, keys, usage log and statements of the signed-in account.

Every page takes the account id from the session (``require_customer``), never from the URL
or a form, and reads through the same billing/store functions as the JSON API: the usage log
is ``store.reports.usage_page`` with the API's filters (``web.queries.log_filter``), summaries
come from the hourly rollups, statements from the wallet days, keys from ``billing.keys``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.engine import Connection
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.billing import codes
from tollway.billing import keys as key_ops
from tollway.billing import notifications as notify
from tollway.billing.reports import (
    STATEMENT_LINES,
    month_bounds,
    record_view,
    statement_csv,
    statement_view,
    summary_view,
)
from tollway.billing.views import balance_view, iso, key_view, parse_amount, parse_iso_ms
from tollway.clock import now_ms
from tollway.errors import (
    CodeExpired,
    CodeRedeemed,
    InvalidRequest,
    UnknownApiKey,
    UnknownCode,
)
from tollway.money import format_usd
from tollway.notify import targets
from tollway.runtime import queries
from tollway.runtime.context import Context
from tollway.runtime.http import form_data, path_int
from tollway.store import accounts as account_store
from tollway.store import reports as report_store
from tollway.store.catalog import current_items, group_ratios
from tollway.store.reports import DAY_MS, HOUR_MS, LOG_TYPES
from tollway.web.auth import auth_routes
from tollway.web.charts import Bar, bar_chart, column_chart
from tollway.web.pages import render
from tollway.web.session import check_csrf, require_customer

PERIODS = (1, 7, 30, 90)  # days the overview can cover
USAGE_COLUMNS = (("time", "Time"), ("type", "Type"), ("product", "Model / endpoint"),
                 ("key", "Key"), ("group", "Group"), ("tokens", "Tokens in / out"),
                 ("calls", "Calls"), ("status", "Status"), ("duration", "Duration"),
                 ("cost", "Cost (USD)"))
USAGE_TOGGLES = (*USAGE_COLUMNS, ("pricing", "Pricing rows"))


async def console_scope(request: Request, ctx: Context) -> int:
    """The signed-in customer's account: the scope of the reports the console reuses."""
    session = await require_customer(request)
    assert session.account_id is not None
    return session.account_id


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


# ----------------------------------------------------------------------------- overview


async def overview(request: Request) -> Response:
    account_id = await console_scope(request, _ctx(request))
    return await _overview(request, account_id)


async def _overview(request: Request, account_id: int, *,
                    redeemed: dict[str, Any] | None = None, redeem_error: str | None = None,
                    status: int = 200) -> Response:
    days = queries.query_int(request, "days", default=30, high=366) or 30
    end = now_ms()
    end += -end % HOUR_MS  # whole hours: the rollups' grain
    start = end - days * DAY_MS

    def load(conn: Connection) -> dict[str, Any]:
        account = account_store.get_account(conn, account_id)
        by_day, totals = report_store.summary(conn, account_id=account_id, start_ms=start,
                                              end_ms=end, group_by=["day"])
        by_product, _ = report_store.summary(conn, account_id=account_id, start_ms=start,
                                             end_ms=end, group_by=["product", "billing_type"])
        by_model, _ = report_store.summary(conn, account_id=account_id, start_ms=start,
                                           end_ms=end, group_by=["model"])  # images too
        return {"account": account, "balance": balance_view(account),
                "summary": summary_view(by_day, totals, start_ms=start, end_ms=end),
                "products": summary_view(by_product, totals, start_ms=start, end_ms=end),
                "models": summary_view(by_model, totals, start_ms=start, end_ms=end)}

    data = await _ctx(request).read(load)
    spend_by_day = _days(data["summary"]["data"], start, end)
    products = data["products"]["data"]
    models = data["models"]["data"]
    spend_by_model = [Bar(p["product"], Decimal(p["cost_usd"]), p["cost_usd"])
                      for p in sorted(models, key=lambda p: Decimal(p["cost_usd"]),
                                      reverse=True)]
    requests_total = sum(int(p["requests"]) for p in products)
    share = [Bar(p["product"], Decimal(int(p["requests"])),
                 f"{int(p['requests'])} ({_percent(int(p['requests']), requests_total)})")
             for p in sorted(products, key=lambda p: int(p["requests"]), reverse=True)]
    return await render(request, "console/overview.html", {
        **data, "days": days, "periods": PERIODS, "spend_by_day": spend_by_day,
        "spend_by_model": spend_by_model, "call_share": share,
        "day_chart": column_chart(spend_by_day, f"Spend per day, last {days} days (USD)"),
        "model_chart": bar_chart(spend_by_model, "Spend by model (USD)"),
        "share_chart": bar_chart(share, "Requests by product"),
        "redeemed": redeemed, "redeem_error": redeem_error}, status=status)


async def redeem_code(request: Request) -> Response:
    """The overview's "Redeem a code" form: ``billing.codes.redeem`` credits the code's amount
    once; an unknown, expired, revoked or already redeemed code is shown on the form."""
    account_id = await console_scope(request, _ctx(request))
    form = await form_data(request)
    await check_csrf(request, form)
    code = _form_text(form, "code")
    try:
        if code is None:
            raise InvalidRequest("enter the code you were given")
        done = await _ctx(request).write(
            lambda conn: codes.redeem(conn, account_id, code, now_ms()), account_id=account_id)
    except (InvalidRequest, UnknownCode, CodeRedeemed, CodeExpired) as exc:
        return await _overview(request, account_id, redeem_error=exc.message,
                               status=exc.status)
    return await _overview(request, account_id, redeemed=codes.redemption_view(done))


def _percent(part: int, whole: int) -> str:
    if not whole:
        return "0%"
    return f"{(Decimal(part) * 100 / whole).quantize(Decimal('0.1'))}%"


def _days(rows: list[dict[str, Any]], start: int, end: int) -> list[Bar]:
    """One bar per UTC day of the period, days without usage included (as zero)."""
    spent = {row["day"]: row["cost_usd"] for row in rows}
    bars = []
    day = start - start % DAY_MS
    while day < end:
        key = iso(day)
        cost = spent.get(key, format_usd(0))
        label = datetime.fromtimestamp(day / 1000, tz=UTC).strftime("%m-%d")
        bars.append(Bar(label, Decimal(cost), cost))
        day += DAY_MS
    return bars


# ----------------------------------------------------------------------------- notifications

EVENTS_SHOWN = 20


async def notifications_page(request: Request) -> Response:
    """Where low-balance and top-up notifications go (``billing.notifications``), editable,
    and the latest events with every delivery attempt."""
    account_id = await console_scope(request, _ctx(request))
    if request.method != "POST":
        return await _notifications(request, account_id)
    form = await form_data(request)
    await check_csrf(request, form)
    body = {name: _form_text(form, name) for name in notify.FIELDS}
    try:
        notify.parse_changes(body)  # refuse bad input before queueing a write
        await targets.check_saved(body)
        await _ctx(request).write(lambda conn: notify.update(conn, account_id, body,
                                                             at_ms=now_ms()))
    except InvalidRequest as exc:
        return await _notifications(request, account_id, error=exc.message, form=form,
                                    status=400)
    return RedirectResponse("/console/notifications?saved=1", status_code=303)


async def _notifications(request: Request, account_id: int, *, error: str | None = None,
                         form: FormData | None = None, status: int = 200) -> Response:
    def load(conn: Connection) -> dict[str, Any]:
        return {"settings": notify.current(conn, account_id),
                "events": notify.events_page(conn, account_id, limit=EVENTS_SHOWN)["data"]}

    data = await _ctx(request).read(load)
    values = {name: (form.get(name) if form is not None else data["settings"][name]) or ""
              for name in notify.FIELDS}
    return await render(request, "console/notifications.html", {
        **data, "values": values, "error": error,
        "saved": request.query_params.get("saved") == "1" and error is None}, status=status)


# ----------------------------------------------------------------------------- keys


async def keys_page(request: Request) -> Response:
    account_id = await console_scope(request, _ctx(request))
    if request.method == "POST":
        return await _create_key(request, account_id)
    return await _keys(request, account_id)


async def _keys(request: Request, account_id: int, *, created: dict[str, Any] | None = None,
                error: str | None = None, form: FormData | None = None,
                status: int = 200) -> Response:
    def load(conn: Connection) -> dict[str, Any]:
        account = account_store.get_account(conn, account_id)
        return {"account": account,
                "keys": [key_view(k) for k in account_store.list_keys(conn, account_id)],
                "items": [item.id for item in current_items(conn, now_ms=now_ms())]}

    data = await _ctx(request).read(load)
    return await render(request, "console/keys.html", {
        **data, "created": created, "error": error, "form": form or {}, "now": iso(now_ms())},
        status=status)


def _form_text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    return value.strip() or None if isinstance(value, str) else None


async def _create_key(request: Request, account_id: int) -> Response:
    form = await form_data(request)
    await check_csrf(request, form)
    try:
        name, group = _form_text(form, "name"), _form_text(form, "group")
        models = [m for m in form.getlist("models") if isinstance(m, str) and m] or None
        quota = _form_text(form, "quota_usd")
        quota_nano = None if quota is None else parse_amount(quota, what="quota_usd")
        expires = _form_text(form, "expires_at")
        expires_ms = None if expires is None else parse_iso_ms(expires, what="expiry date")
        if name is not None and len(name) > 200:
            raise InvalidRequest("a key name must be at most 200 characters")
        new = await _ctx(request).write(lambda conn: key_ops.create_key(
            conn, account_id, at_ms=now_ms(), name=name, group=group, models=models,
            quota_nano=quota_nano, expires_at_ms=expires_ms, by_customer=True))
    except InvalidRequest as exc:
        return await _keys(request, account_id, error=exc.message, form=form, status=400)
    return await _keys(request, account_id, created=key_view(new.record, secret=new.secret),
                       status=201)


async def revoke_key(request: Request) -> Response:
    account_id = await console_scope(request, _ctx(request))
    form = await form_data(request)
    await check_csrf(request, form)
    key_id = path_int(request, "key_id")

    def revoke(conn: Connection) -> None:
        # another account's key reads exactly like a missing one
        if account_store.get_key(conn, key_id).account_id != account_id:
            raise UnknownApiKey(f"no API key with id {key_id}")
        key_ops.revoke_key(conn, key_id, at_ms=now_ms())

    await _ctx(request).write(revoke)
    return RedirectResponse("/console/keys", status_code=303)


# ----------------------------------------------------------------------------- usage log


async def usage_page(request: Request) -> Response:
    account_id = await console_scope(request, _ctx(request))
    where = queries.log_filter(request, account_id)
    limit = queries.query_int(request, "limit", default=50, high=500) or 50
    cursor = request.query_params.get("cursor") or None

    def load(conn: Connection) -> dict[str, Any]:
        rows, next_cursor = report_store.usage_page(conn, where, limit=limit, cursor=cursor)
        return {"records": [record_view(r) for r in rows], "next_cursor": next_cursor,
                "keys": [key_view(k) for k in account_store.list_keys(conn, account_id)],
                "groups": sorted(set(group_ratios(conn)) | {"default"})}

    data = await _ctx(request).read(load)
    filters = {k: v for k, v in request.query_params.items()
               if k not in ("cursor",) and v}
    for record in data["records"]:
        record["pricing_json"] = (None if record["pricing"] is None else
                                  json.dumps(record["pricing"], indent=2, ensure_ascii=False))
    return await render(request, "console/usage.html", {
        **data, "filters": filters, "types": LOG_TYPES, "columns": USAGE_COLUMNS,
        "toggles": USAGE_TOGGLES,
        "older": (None if data["next_cursor"] is None else
                  "?" + urlencode({**filters, "cursor": data["next_cursor"]})),
        "newest": "?" + urlencode(filters) if cursor else None,
        "export": "/console/usage/export?" + urlencode(
            {k: v for k, v in filters.items() if k != "limit"})})


# ----------------------------------------------------------------------------- statements


async def statements_page(request: Request) -> Response:
    account_id = await console_scope(request, _ctx(request))
    today = datetime.now(tz=UTC)
    month = request.query_params.get("month") or today.strftime("%Y-%m")
    start, end = month_bounds(month)

    def load(conn: Connection) -> tuple[Any, dict[str, Any]]:
        account = account_store.get_account(conn, account_id)
        return account, statement_view(account, month, report_store.statement(
            conn, account_id, start_ms=start, end_ms=end))

    account, view = await _ctx(request).read(load)
    if request.query_params.get("format") == "csv":
        return Response(statement_csv(view), media_type="text/csv", headers={
            "content-disposition": f'attachment; filename="statement-{month}.csv"'})
    return await render(request, "console/statements.html", {
        "statement": view, "month": month, "lines": STATEMENT_LINES,
        "months": _months(account.created_at_ms, today)})


def _months(since_ms: int, today: datetime) -> list[str]:
    """Every month from the account's creation to this one, newest first."""
    first = datetime.fromtimestamp(since_ms / 1000, tz=UTC)
    year, month = today.year, today.month
    out: list[str] = []
    while (year, month) >= (first.year, first.month) and len(out) < 120:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year, month - 1) if month > 1 else (year - 1, 12)
    return out


console_routes: list[BaseRoute] = [
    *auth_routes,
    Route("/console", overview),
    Route("/console/redeem", redeem_code, methods=["POST"]),
    Route("/console/notifications", notifications_page, methods=["GET", "POST"]),
    Route("/console/keys", keys_page, methods=["GET", "POST"]),
    Route("/console/keys/{key_id}/revoke", revoke_key, methods=["POST"]),
    Route("/console/usage", usage_page),
    Route("/console/usage/export", queries.usage_export(console_scope)),
    Route("/console/statements", statements_page),
]
