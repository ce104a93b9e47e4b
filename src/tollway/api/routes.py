"""The JSON API's route table: health, metrics, the OpenAPI document, the marketplace listing,
the customer's billing routes (their key's account) and the operator's admin API."""

from __future__ import annotations

import hmac

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from tollway import settings
from tollway.api import notifications, reports
from tollway.api.admin import admin_routes
from tollway.api.openapi import SPEC
from tollway.billing import keys
from tollway.billing.marketplace import listing
from tollway.billing.views import balance_view
from tollway.clock import now_ms
from tollway.errors import InvalidAdminToken
from tollway.ledger.ledger import open_holds
from tollway.metrics import CONTENT_TYPE, METRICS
from tollway.runtime.context import Context
from tollway.runtime.http import bearer
from tollway.runtime.queries import usage_export
from tollway.store import accounts as store


async def healthz(request: Request) -> JSONResponse:
    ctx: Context = request.app.state.ctx
    await ctx.read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
    return JSONResponse({"status": "ok", "database": ctx.db.dialect})


async def metrics(request: Request) -> Response:
    """Prometheus text exposition of every worker's counters (see ``tollway.metrics``)."""
    ctx: Context = request.app.state.ctx
    token = bearer(request) or ""
    allowed = [t for t in (ctx.admin_token, settings.get("metrics_token")) if t]
    if not any(hmac.compare_digest(token.encode(), t.encode()) for t in allowed):
        raise InvalidAdminToken("/metrics needs 'Authorization: Bearer <metrics or admin "
                                "token>'")
    count, oldest_ms = await ctx.read(open_holds)
    age_s = max(now_ms() - oldest_ms, 0) / 1000 if oldest_ms is not None else 0.0
    return PlainTextResponse(METRICS.exposition(open_holds=count, oldest_hold_age_s=age_s),
                             media_type=CONTENT_TYPE)


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(SPEC)


async def marketplace(request: Request) -> JSONResponse:
    ctx: Context = request.app.state.ctx
    return JSONResponse(await ctx.read(lambda conn: listing(conn, now_ms=now_ms())))


async def balance(request: Request) -> JSONResponse:
    ctx: Context = request.app.state.ctx
    secret = bearer(request)

    def load(conn: object) -> dict[str, object]:
        record = keys.authenticate(conn, secret, now_ms=now_ms())  # type: ignore[arg-type]
        account = store.get_account(conn, record.account_id)  # type: ignore[arg-type]
        return {"object": "balance", "account_id": account.id, **balance_view(account)}

    return JSONResponse(await ctx.read(load))


customer = reports.customer_scope

api_routes: list[BaseRoute] = [
    Route("/healthz", healthz),
    Route("/metrics", metrics),
    Route("/openapi.json", openapi),
    Route("/v1/marketplace", marketplace),
    Route("/v1/billing/balance", balance),
    Route("/v1/billing/usage", reports.usage_list(customer)),
    Route("/v1/billing/usage/export", usage_export(customer)),
    Route("/v1/billing/usage/{request_id}", reports.usage_one(customer)),
    Route("/v1/billing/summary", reports.summary(customer)),
    Route("/v1/billing/statement", reports.statement(customer)),
    Route("/v1/billing/notifications", notifications.events(customer)),
    Route("/v1/billing/notifications/settings", notifications.get_settings(customer),
          methods=["GET"]),
    Route("/v1/billing/notifications/settings", notifications.put_settings(customer),
          methods=["PUT"]),
    Route("/v1/billing/notifications/settings/rotate-secret",
          notifications.rotate_secret(customer), methods=["POST"]),
    Route("/v1/billing/redeem", notifications.redeem(customer), methods=["POST"]),
    Mount("/admin/v1", routes=admin_routes),
]
