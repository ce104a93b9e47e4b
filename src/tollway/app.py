"""The application, assembled: the JSON API (``api/``), the gateway (``gateway/``) and the
HTML console (``web/``) side by side, over the runtime (``runtime/``) that serves them all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from tollway import settings, tracing
from tollway.api.payments import payment_routes
from tollway.api.reports import customer_scope
from tollway.api.routes import api_routes
from tollway.billing import keys
from tollway.clock import Clock, now_ms
from tollway.errors import TollwayError
from tollway.gateway.routes import gateway_routes
from tollway.gateway.state import Gateway
from tollway.metrics import METRICS, register_worker
from tollway.notify.deliverer import Deliverer
from tollway.runtime import cors
from tollway.runtime.context import Context
from tollway.runtime.direct import TollwayApp
from tollway.runtime.errors import http_error, missing_v1, tollway_error, unexpected_error
from tollway.runtime.observe import ERROR_CODE, REQUEST_ID, ObserveMiddleware
from tollway.store.db import Database, storage_error
from tollway.store.writer import Writer
from tollway.upstreams.channels import Board, Policy, parse_statuses
from tollway.upstreams.http import Timeouts
from tollway.upstreams.registry import Registry
from tollway.web import pages
from tollway.web.billing_pages import csrf_session_scope, has_session
from tollway.web.routes import web_routes
from tollway.web.session import LoginRequired, login_required


async def key_or_session(request: Request, ctx: Context) -> int:
    """Card top-ups (``api/payments.py``) are for an API key's account or, from the console,
    a signed-in session's (with its CSRF token); a request with a key is the key's."""
    if request.headers.get("authorization") or not await has_session(request):
        return await customer_scope(request, ctx)
    return await csrf_session_scope(request, ctx)


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


def create_app(*, database_url: str | None = None, admin_token: str | None = None,
               clock: Clock | None = None) -> Starlette:
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
                      notify_interval_s=float(settings.get("notify_interval_seconds")),
                      clock=clock or now_ms, trusted_proxies=trusted,
                      channels=Board(Policy(
                          failures=int(settings.get("channel_failures")),
                          cooldown_ms=int(float(settings.get("channel_cooldown_seconds")) * 1000),
                          max_attempts=int(settings.get("channel_max_attempts")),
                          retry_statuses=parse_statuses(settings.get("channel_retry_statuses")))))
        registry = Registry(timeouts=Timeouts(
            connect_s=float(settings.get("upstream_connect_timeout_seconds")),
            read_s=float(settings.get("upstream_read_timeout_seconds"))),
            max_body_bytes=int(settings.get("max_upstream_body_bytes")))
        gw = Gateway(ctx, registry,
                     catalog_refresh_s=int(settings.get("catalog_refresh_seconds")),
                     key_cache_s=int(settings.get("key_cache_seconds")),
                     max_body_bytes=ctx.max_body_bytes,
                     headers_timeout_s=float(settings.get("upstream_headers_timeout_seconds")),
                     read_timeout_s=float(settings.get("upstream_read_timeout_seconds")),
                     cost_tolerance=Decimal(settings.get("upstream_cost_tolerance")),
                     stream_disconnect=settings.get("stream_disconnect"),
                     health_interval_s=float(settings.get("channel_health_interval_seconds")))
        app.state.ctx = ctx
        app.state.gateway = gw
        register_worker()
        tracing.configure()
        publisher = asyncio.create_task(METRICS.publish_every())
        ctx.start()
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()
            await ctx.stop()
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
            tracing.shutdown()

    routes = [*api_routes, *payment_routes(key_or_session), *gateway_routes, *web_routes]
    max_inflight = int(settings.get("max_inflight_requests"))
    log_requests = settings.get("log_requests").lower()
    middleware = [Middleware(ObserveMiddleware, max_inflight=max_inflight,
                             log_requests=log_requests)]
    origins = [o.strip() for o in settings.get("cors_origins").split(",") if o.strip()]
    if origins:  # off by default: no middleware at all, nothing on the request path
        middleware.insert(0, cors.middleware(origins))
    return TollwayApp(
        # with CORS on, every request takes Starlette's way, so CORS wraps the gateway too
        direct_routes=() if origins else gateway_routes, max_inflight=max_inflight,
        log_requests=log_requests,
        routes=routes,
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={TollwayError: error, HTTPException: error,
                            LoginRequired: login_required, Exception: unexpected},
    )
