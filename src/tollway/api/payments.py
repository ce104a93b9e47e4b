"""Card top-ups over HTTP: ``POST /v1/billing/checkout``, ``GET /v1/billing/payments`` and
auto-recharge (``GET``/``PUT /v1/billing/auto_recharge``, ``POST
/v1/billing/auto_recharge/card`` to save a card) for the account the caller's ``Scope``
names (``app.py`` gives them an API key's account, or a console session's with its CSRF
token in ``X-CSRF-Token``), and ``POST /webhooks/stripe`` (Stripe's events, verified by
signature; auto-recharge's own events go to ``billing.auto_recharge``).

The webhook reads the order the event names first, only to learn its account: the write then
goes to the writer ordered by that account like every money movement (``Writer``), and
``billing.payments.handle_event`` looks everything up again inside the transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from tollway.billing import auto_recharge, payments, receipts, stripe_checkout
from tollway.errors import PaymentMismatch, TollwayError
from tollway.money import format_usd
from tollway.runtime.context import Context
from tollway.runtime.http import json_body, limited_body, path_int
from tollway.runtime.queries import Scope, query_int

Endpoint = Callable[[Request], Awaitable[Response]]

log = logging.getLogger("tollway.payments")


def checkout(scope: Scope) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        body = await json_body(request)
        return JSONResponse(await payments.start_checkout(
            ctx.write, account_id, body.get("amount_usd"), at_ms=ctx.clock()), status_code=201)
    return endpoint


def payment_list(scope: Scope) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        limit = query_int(request, "limit", default=50, high=500) or 50
        cursor = query_int(request, "cursor")
        return JSONResponse(await ctx.read(lambda conn: payments.orders_page(
            conn, account_id, limit=limit, cursor=cursor)))
    return endpoint


def recharge_get(scope: Scope) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        return JSONResponse(await ctx.read(lambda conn: auto_recharge.view(
            conn, account_id, at_ms=ctx.clock())))
    return endpoint


def recharge_put(scope: Scope) -> Endpoint:
    """Save the setting (400 invalid_request for a bad one; saving resumes a paused one)."""
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        body = await json_body(request)
        return JSONResponse(await ctx.write(lambda conn: auto_recharge.save(
            conn, account_id, body, at_ms=ctx.clock()), account_id=account_id))
    return endpoint


def recharge_card(scope: Scope) -> Endpoint:
    """A Checkout Session in setup mode where the customer saves the card to charge."""
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        return JSONResponse(await auto_recharge.start_card_setup(
            ctx.write, account_id, at_ms=ctx.clock()), status_code=201)
    return endpoint


def receipt_pdf(scope: Scope) -> Endpoint:
    """A paid order's receipt as a PDF (404 for another account's, unpaid or missing)."""
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        order_id = path_int(request, "order_id")
        data = await ctx.read(lambda conn: receipts.receipt_data(conn, account_id, order_id))
        return Response(await run_in_threadpool(receipts.pdf, data),
                        media_type="application/pdf", headers=receipts.pdf_headers(data))
    return endpoint


async def _account(scope: Scope, request: Request, ctx: Context) -> int:
    account_id = await scope(request, ctx)
    assert account_id is not None
    return account_id


async def stripe_webhook(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    payload = await limited_body(request)
    try:
        event = stripe_checkout.verify(payload, request.headers.get("stripe-signature"))
    except TollwayError as exc:
        log.warning("stripe webhook refused: %s", exc.message)
        raise
    if event["type"] in auto_recharge.EVENTS:
        account_id = await ctx.read(lambda conn: auto_recharge.event_account(conn, event))
        result = await ctx.write(lambda conn: auto_recharge.handle_event(
            conn, event, at_ms=ctx.clock()), account_id=account_id)
    elif payments.handles(event):
        account_id = await ctx.read(lambda conn: payments.order_account(conn, event))
        result = await ctx.write(lambda conn: payments.handle_event(
            conn, event, at_ms=ctx.clock()), account_id=account_id)
    else:
        return JSONResponse({"received": True, "outcome": "ignored"})
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


def payment_routes(scope: Scope) -> list[BaseRoute]:
    """The routes, the customer ones for the account ``scope`` resolves."""
    return [Route("/v1/billing/checkout", checkout(scope), methods=["POST"]),
            Route("/v1/billing/payments", payment_list(scope), methods=["GET"]),
            Route("/v1/billing/payments/{order_id}/receipt.pdf", receipt_pdf(scope),
                  methods=["GET"]),
            *recharge_routes("/v1/billing/auto_recharge", scope),
            Route("/v1/billing/auto_recharge/card", recharge_card(scope), methods=["POST"]),
            Route("/webhooks/stripe", stripe_webhook, methods=["POST"])]


def recharge_routes(path: str, scope: Scope) -> list[BaseRoute]:
    """Auto-recharge's routes under ``path`` (the customer's, or the operator's per account)."""
    return [Route(path, recharge_get(scope), methods=["GET"]),
            Route(path, recharge_put(scope), methods=["PUT"])]
