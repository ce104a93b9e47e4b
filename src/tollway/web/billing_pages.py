"""The console's money-in pages: "Add funds" (presets and a custom amount, then off to
Stripe Checkout), auto-recharge (its form, and "save a card" off to Stripe's set-up page),
the page Stripe sends the customer back to, payment history and printable receipts. Like
every console page they take the account from the session; a receipt is shown only for a
paid order of that account (another account's order is a 404, as a missing one).
"""

from __future__ import annotations

import hmac
from typing import Any

from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tollway import settings
from tollway.billing import auto_recharge, payments, receipts
from tollway.billing.views import balance_view
from tollway.errors import CsrfFailed, NotFound, TollwayError
from tollway.runtime.context import Context
from tollway.runtime.http import form_data, path_int
from tollway.runtime.queries import query_int
from tollway.store import accounts as account_store
from tollway.store import payments as store
from tollway.web.console import console_scope
from tollway.web.pages import render
from tollway.web.session import check_csrf, current_session, require_customer


async def has_session(request: Request) -> bool:
    return await current_session(request) is not None


async def csrf_session_scope(request: Request, ctx: Context) -> int:
    """The signed-in customer's account for a JSON call from the console, which must carry
    the session's CSRF token in ``X-CSRF-Token`` (as its forms carry it in a field)."""
    session = await require_customer(request)
    given = request.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
        raise CsrfFailed("a console session's request needs its CSRF token in X-CSRF-Token")
    assert session.account_id is not None
    return session.account_id


def _ctx(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


async def billing_page(request: Request) -> Response:
    ctx = _ctx(request)
    account_id = await console_scope(request, ctx)
    error = None
    if request.method == "POST":
        form = await form_data(request)
        await check_csrf(request, form)
        amount = form.get("custom") or form.get("amount")
        try:
            started = await payments.start_checkout(ctx.write, account_id, amount,
                                                    at_ms=ctx.clock())
        except TollwayError as exc:
            error = exc.message
        else:
            return RedirectResponse(started["url"], status_code=303)
    return await _billing(request, account_id, error=error)


async def recharge_page(request: Request) -> Response:
    """The auto-recharge form: saved like ``PUT /v1/billing/auto_recharge``."""
    ctx = _ctx(request)
    account_id = await console_scope(request, ctx)
    form = await form_data(request)
    await check_csrf(request, form)
    body: dict[str, Any] = {"enabled": form.get("enabled") == "on"}
    for name in ("threshold_usd", "target_usd", "monthly_cap_usd"):
        if value := str(form.get(name) or "").strip():
            body[name] = value
    try:
        await ctx.write(lambda conn: auto_recharge.save(conn, account_id, body,
                                                        at_ms=ctx.clock()),
                        account_id=account_id)
    except TollwayError as exc:
        return await _billing(request, account_id, error=None, recharge_error=exc.message)
    return RedirectResponse("/console/billing?recharge=saved", status_code=303)


async def card_page(request: Request) -> Response:
    """Off to Stripe's set-up page to save the card auto-recharge charges."""
    ctx = _ctx(request)
    account_id = await console_scope(request, ctx)
    await check_csrf(request, await form_data(request))
    try:
        started = await auto_recharge.start_card_setup(ctx.write, account_id,
                                                       at_ms=ctx.clock())
    except TollwayError as exc:
        return await _billing(request, account_id, error=None, recharge_error=exc.message)
    return RedirectResponse(started["url"], status_code=303)


async def _billing(request: Request, account_id: int, *, error: str | None,
                   recharge_error: str | None = None) -> Response:
    limits = payments.bounds()
    ctx = _ctx(request)

    def load(conn: Connection) -> dict[str, Any]:
        account = account_store.get_account(conn, account_id)
        return {"account": account, "balance": balance_view(account),
                "orders": payments.orders_page(conn, account_id, limit=50, cursor=None)["data"],
                "recharge": auto_recharge.view(conn, account_id, at_ms=ctx.clock())}

    data = await ctx.read(load)
    failed = error or recharge_error
    return await render(request, "console/billing.html", {
        **data, "error": error, "recharge_error": recharge_error, "enabled": _enabled(),
        "presets": [payments.usd_cents(p) for p in limits.presets_nano],
        "min_usd": payments.usd_cents(limits.min_nano),
        "max_usd": payments.usd_cents(limits.max_nano),
        "usd2": receipts.cents}, status=400 if failed else 200)


def _enabled() -> bool:
    return bool(settings.get("stripe_secret_key") and settings.get("stripe_webhook_secret"))


async def return_page(request: Request) -> Response:
    """Where Stripe sends the customer back. The order's state is read from Tollway's own
    row (the webhook credits it); the query string only says which order to show."""
    ctx = _ctx(request)
    account_id = await console_scope(request, ctx)
    order_id = query_int(request, "order")
    canceled = request.query_params.get("canceled") == "1"

    def load(conn: Connection) -> dict[str, Any]:
        row = store.get(conn, order_id) if order_id else None
        if row is None or row.account_id != account_id:
            raise NotFound("no such payment")
        return {"order": payments.order_view(row),
                "balance": balance_view(account_store.get_account(conn, account_id))}

    data = await ctx.read(load)
    return await render(request, "console/billing_return.html",
                        {**data, "canceled": canceled, "usd2": receipts.cents})


async def receipt(request: Request) -> Response:
    ctx = _ctx(request)
    account_id = await console_scope(request, ctx)
    order_id = path_int(request, "order_id")
    data = await ctx.read(lambda conn: receipts.receipt_data(conn, account_id, order_id))
    name, address = receipts.business()
    return await render(request, "console/receipt.html", {
        **data, "usd2": receipts.cents, "business_name": name,
        "business_address": "\n".join(address)})


async def receipt_pdf(request: Request) -> Response:
    """The same receipt as a PDF download."""
    ctx = _ctx(request)
    account_id = await console_scope(request, ctx)
    order_id = path_int(request, "order_id")
    data = await ctx.read(lambda conn: receipts.receipt_data(conn, account_id, order_id))
    return Response(await run_in_threadpool(receipts.pdf, data),
                    media_type="application/pdf", headers=receipts.pdf_headers(data))


billing_routes = [
    Route("/console/billing", billing_page, methods=["GET", "POST"]),
    Route("/console/billing/auto_recharge", recharge_page, methods=["POST"]),
    Route("/console/billing/auto_recharge/card", card_page, methods=["POST"]),
    Route("/console/billing/return", return_page),
    Route("/console/billing/receipts/{order_id}.pdf", receipt_pdf),
    Route("/console/billing/receipts/{order_id}", receipt),
]
