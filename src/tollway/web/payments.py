"""Card top-ups over HTTP: ``POST /v1/billing/checkout`` (an API key, or a console session
with its CSRF token in ``X-CSRF-Token``), ``GET /v1/billing/payments`` (the account's
orders) and ``POST /webhooks/stripe`` (Stripe's events, verified by signature).

The webhook reads the order the event names first, only to learn its account: the write then
goes to the writer ordered by that account like every money movement (``Writer``), and
``billing.payments.handle_event`` looks everything up again inside the transaction.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tollway import settings
from tollway.billing import keys, payments, stripe_checkout
from tollway.errors import CsrfFailed, PaymentMismatch, PaymentsUnavailable, TollwayError
from tollway.ledger.ledger import now_ms
from tollway.money import format_usd
from tollway.store import payments as store
from tollway.web.context import Context
from tollway.web.http import bearer, json_body, limited_body
from tollway.web.reports import query_int
from tollway.web.session import current_session, require_customer

log = logging.getLogger("tollway.payments")


async def payer(request: Request, ctx: Context) -> int:
    """The account paying: the API key's, or the signed-in customer's (whose JSON calls must
    carry the session's CSRF token, as its forms do)."""
    secret = bearer(request)
    if secret is not None or await current_session(request) is None:
        record = await ctx.read(lambda conn: keys.authenticate(conn, secret, now_ms=now_ms()))
        return record.account_id
    session = await require_customer(request)
    given = request.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(given.encode(), session.csrf_token.encode()):
        raise CsrfFailed("a console session's request needs its CSRF token in X-CSRF-Token")
    assert session.account_id is not None
    return session.account_id


async def start_checkout(ctx: Context, account_id: int, amount: object) -> dict[str, Any]:
    """Write the order, create its Checkout Session, store the session's id on the order."""
    amount_nano = payments.parse_amount(amount, payments.bounds())
    if not stripe_checkout.configured():
        raise PaymentsUnavailable("card top-ups are not configured on this server "
                                  "(TOLLWAY_STRIPE_SECRET_KEY, TOLLWAY_STRIPE_WEBHOOK_SECRET)")
    order_id = await ctx.write(lambda conn: payments.create_order(
        conn, account_id, amount_nano, at_ms=now_ms()), account_id=account_id)
    base = settings.get("public_url").rstrip("/")
    try:
        session = await run_in_threadpool(
            stripe_checkout.create_session, order_id=order_id, account_id=account_id,
            amount_cents=amount_nano // payments.NANO_PER_CENT, currency=payments.CURRENCY,
            reference=payments.client_reference(order_id),
            success_url=f"{base}/console/billing/return?order={order_id}"
                        "&session_id={CHECKOUT_SESSION_ID}",
            cancel_url=f"{base}/console/billing/return?order={order_id}&canceled=1")
    except TollwayError:
        await ctx.write(lambda conn: store.mark_closed(conn, order_id, "failed"),
                        account_id=account_id)
        raise
    await ctx.write(lambda conn: store.set_session(conn, order_id, session.id),
                    account_id=account_id)
    return {"object": "checkout", "id": session.id, "url": session.url, "order_id": order_id,
            "amount_usd": format_usd(amount_nano), "currency": payments.CURRENCY}


async def checkout(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    account_id = await payer(request, ctx)
    body = await json_body(request)
    return JSONResponse(await start_checkout(ctx, account_id, body.get("amount_usd")),
                        status_code=201)


async def payment_list(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    account_id = await payer(request, ctx)
    limit = query_int(request, "limit", default=50, high=500) or 50
    cursor = query_int(request, "cursor")
    return JSONResponse(await ctx.read(lambda conn: payments.orders_page(
        conn, account_id, limit=limit, cursor=cursor)))


async def stripe_webhook(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    payload = await limited_body(request)
    try:
        event = stripe_checkout.verify(payload, request.headers.get("stripe-signature"))
    except TollwayError as exc:
        log.warning("stripe webhook refused: %s", exc.message)
        raise
    if not payments.handles(event):
        return JSONResponse({"received": True, "outcome": "ignored"})
    account_id = await ctx.read(lambda conn: payments.order_account(conn, event))
    result = await ctx.write(lambda conn: payments.handle_event(conn, event, at_ms=now_ms()),
                             account_id=account_id)
    level = logging.WARNING if result.refused or result.outcome.startswith("unknown") else (
        logging.INFO)
    log.log(level, "stripe event %s (%s): %s%s, order %s", result.event_id, result.type,
            result.outcome, " (replay)" if result.replay else "", result.order_id)
    if result.refused:
        raise PaymentMismatch(f"event {result.event_id} does not match order "
                              f"{result.order_id} ({result.outcome}); nothing was credited")
    return JSONResponse({"received": True, "outcome": result.outcome, "replay": result.replay,
                         "order_id": result.order_id,
                         "credited_usd": format_usd(result.credited_nano)})


payment_routes = [
    Route("/v1/billing/checkout", checkout, methods=["POST"]),
    Route("/v1/billing/payments", payment_list, methods=["GET"]),
    Route("/webhooks/stripe", stripe_webhook, methods=["POST"]),
]
