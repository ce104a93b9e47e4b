"""The Starlette application: public marketplace, customer billing routes, admin API."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from tollway import settings
from tollway.admin.routes import admin_routes
from tollway.billing import keys
from tollway.billing.marketplace import listing
from tollway.billing.views import balance_view
from tollway.errors import InvalidAdminToken, TollwayError
from tollway.gateway.apis import ApiRoute
from tollway.gateway.count_tokens import CountTokensRoute
from tollway.gateway.images import ImagesRoute
from tollway.gateway.llm import LLMRoute
from tollway.gateway.messages import MessagesRoute
from tollway.gateway.models import ModelsRoute
from tollway.gateway.responses import ResponsesRoute
from tollway.gateway.state import Gateway
from tollway.ledger.ledger import now_ms, open_holds
from tollway.metrics import METRICS
from tollway.notify.deliverer import Deliverer
from tollway.store import accounts as store
from tollway.store.db import Database, storage_error
from tollway.store.writer import Writer
from tollway.upstreams.http import Timeouts
from tollway.upstreams.registry import Registry
from tollway.web import cors, notifications, pages, reports
from tollway.web.console import console_routes
from tollway.web.context import Context
from tollway.web.errors import http_error, missing_v1, tollway_error, unexpected_error
from tollway.web.http import bearer
from tollway.web.market import market_routes
from tollway.web.observe import ERROR_CODE, REQUEST_ID, ObserveMiddleware
from tollway.web.openapi import SPEC
from tollway.web.operator import operator_routes
from tollway.web.session import LoginRequired, login_required


async def error(request: Request, exc: Exception) -> Response:
    """API paths answer the JSON error body; pages (``pages.is_page``) an HTML page."""
    if isinstance(exc, TollwayError):
        if pages.is_page(request):
            request.scope[ERROR_CODE] = exc.code
            response = await pages.error_page(request, exc.status, exc.message)
            for name, value in exc.response_headers():
                response.headers.append(name.decode(), value.decode())
            return response
        return await tollway_error(request, exc)
    assert isinstance(exc, HTTPException)
    if pages.is_page(request) and not missing_v1(request.url.path):
        return await pages.error_page(request, exc.status_code, str(exc.detail))
    return await http_error(request, exc)


async def unexpected(request: Request, exc: Exception) -> Response:
    """A database failure no layer mapped is 503 storage_unavailable (a page on page paths);
    anything else a 500. Starlette runs this outside the observing middleware, so the request
    id header is set here."""
    unavailable = storage_error(exc)
    if unavailable is None or not pages.is_page(request):
        return await unexpected_error(request, exc)
    response = await error(request, unavailable)
    if request_id := request.scope.get(REQUEST_ID):
        response.headers["x-request-id"] = request_id
    return response


async def healthz(request: Request) -> JSONResponse:
    ctx: Context = request.app.state.ctx
    await ctx.read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
    return JSONResponse({"status": "ok", "database": ctx.db.dialect})


async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this worker's counters (see ``tollway.metrics``)."""
    ctx: Context = request.app.state.ctx
    token = bearer(request) or ""
    allowed = [t for t in (ctx.admin_token, settings.get("metrics_token")) if t]
    if not any(hmac.compare_digest(token.encode(), t.encode()) for t in allowed):
        raise InvalidAdminToken("/metrics needs 'Authorization: Bearer <metrics or admin "
                                "token>'")
    count, oldest_ms = await ctx.read(open_holds)
    age_s = max(now_ms() - oldest_ms, 0) / 1000 if oldest_ms is not None else 0.0
    return PlainTextResponse(METRICS.exposition(open_holds=count, oldest_hold_age_s=age_s),
                             media_type="text/plain; version=0.0.4; charset=utf-8")


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


def create_app(*, database_url: str | None = None, admin_token: str | None = None,
               clock: Callable[[], int] | None = None) -> Starlette:
    """The application; settings not given here come from the environment (``settings``).
    ``clock`` (milliseconds since the epoch) is the gateway's time: tests pass one they move."""
    proxies = settings.get("trusted_proxies")
    trusted = keys.networks(keys.parse_networks(proxies.split(","))) if proxies.strip() else ()
    url = database_url or settings.get("database_url")
    token = admin_token if admin_token is not None else settings.get("admin_token")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database(url)
        writer = Writer(db)
        ctx = Context(db=db, writer=writer, admin_token=token,
                      hold_ttl_ms=int(settings.get("hold_ttl_seconds")) * 1000,
                      reaper_interval_s=int(settings.get("reaper_interval_seconds")),
                      max_body_bytes=int(settings.get("max_body_bytes")),
                      deliverer=Deliverer(writer.run),
                      notify_interval_s=float(settings.get("notify_interval_seconds")))
        registry = Registry(timeouts=Timeouts(
            connect_s=float(settings.get("upstream_connect_timeout_seconds")),
            read_s=float(settings.get("upstream_read_timeout_seconds"))),
            max_body_bytes=int(settings.get("max_upstream_body_bytes")))
        gw = Gateway(ctx, registry,
                     catalog_refresh_s=int(settings.get("catalog_refresh_seconds")),
                     key_cache_s=int(settings.get("key_cache_seconds")),
                     max_body_bytes=ctx.max_body_bytes,
                     clock=clock or now_ms, trusted_proxies=trusted)
        app.state.ctx = ctx
        app.state.gateway = gw
        ctx.start()
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()
            await ctx.stop()

    routes = [
        Route("/healthz", healthz),
        Route("/metrics", metrics),
        Route("/openapi.json", openapi),
        Route("/v1/marketplace", marketplace),
        Route("/v1/billing/balance", balance),
        Route("/v1/billing/usage", reports.usage_list(reports.customer_scope)),
        Route("/v1/billing/usage/export", reports.usage_export(reports.customer_scope)),
        Route("/v1/billing/usage/{request_id}", reports.usage_one(reports.customer_scope)),
        Route("/v1/billing/summary", reports.summary(reports.customer_scope)),
        Route("/v1/billing/statement", reports.statement(reports.customer_scope)),
        Route("/v1/billing/notifications", notifications.events(reports.customer_scope)),
        Route("/v1/billing/notifications/settings",
              notifications.get_settings(reports.customer_scope), methods=["GET"]),
        Route("/v1/billing/notifications/settings",
              notifications.put_settings(reports.customer_scope), methods=["PUT"]),
        Route("/v1/billing/notifications/settings/rotate-secret",
              notifications.rotate_secret(reports.customer_scope), methods=["POST"]),
        Route("/v1/billing/redeem", notifications.redeem(reports.customer_scope),
              methods=["POST"]),
        Route("/v1/chat/completions", LLMRoute("chat"), methods=["POST"]),
        Route("/v1/completions", LLMRoute("completions"), methods=["POST"]),
        Route("/v1/embeddings", LLMRoute("embeddings"), methods=["POST"]),
        Route("/v1/messages", MessagesRoute(), methods=["POST"]),
        Route("/v1/messages/count_tokens", CountTokensRoute(), methods=["POST"]),
        Route("/v1/responses", ResponsesRoute(), methods=["POST"]),
        Route("/v1/images/generations", ImagesRoute(), methods=["POST"]),
        Route("/v1/models", ModelsRoute(), methods=["GET"]),
        Route("/v1/models/{model_id:path}", ModelsRoute(), methods=["GET"]),
        Route("/apis/v1/{path:path}", ApiRoute(),
              methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        Mount("/admin/v1", routes=admin_routes),
        pages.static_mount,
        # web console pages; keep them before any Mount("/admin") so /admin/login matches
        *console_routes,
        *market_routes, *operator_routes,
    ]
    middleware = [Middleware(ObserveMiddleware,
                             max_inflight=int(settings.get("max_inflight_requests")),
                             log_requests=settings.get("log_requests").lower())]
    origins = [o.strip() for o in settings.get("cors_origins").split(",") if o.strip()]
    if origins:  # off by default: no middleware at all, nothing on the request path
        middleware.insert(0, cors.middleware(origins))
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={TollwayError: error, HTTPException: error,
                            LoginRequired: login_required, Exception: unexpected},
    )
