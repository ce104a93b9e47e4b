"""Notification settings, delivery logs and code redemption over HTTP. The same handlers
serve the customer (their key's account) and the operator (the account in the path)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tollway.billing import codes
from tollway.billing import notifications as notify
from tollway.clock import now_ms
from tollway.errors import InvalidRequest
from tollway.notify import targets
from tollway.runtime.context import Context
from tollway.runtime.http import json_body
from tollway.runtime.queries import Scope, query_int

Endpoint = Callable[[Request], Awaitable[Response]]


async def _account(scope: Scope, request: Request, ctx: Context) -> int:
    account_id = await scope(request, ctx)
    if account_id is None:
        raise InvalidRequest("notifications belong to one account")
    return account_id


def events(scope: Scope) -> Endpoint:
    """Events newest first, each with its deliveries and every attempt made."""
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        limit = query_int(request, "limit", default=50, high=500) or 50
        cursor = query_int(request, "cursor")
        return JSONResponse(await ctx.read(lambda conn: notify.events_page(
            conn, account_id, limit=limit, cursor=cursor)))
    return endpoint


def get_settings(scope: Scope) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        return JSONResponse(await ctx.read(lambda conn: notify.current(conn, account_id)))
    return endpoint


def put_settings(scope: Scope) -> Endpoint:
    """Change the fields given (null clears one). The first save creates the secret."""
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        body = await json_body(request)
        notify.parse_changes(body)  # refuse bad input before queueing a write
        await targets.check_saved(body)
        return JSONResponse(await ctx.write(lambda conn: notify.update(
            conn, account_id, body, at_ms=now_ms())))
    return endpoint


def rotate_secret(scope: Scope) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        return JSONResponse(await ctx.write(lambda conn: notify.update(
            conn, account_id, {}, at_ms=now_ms(), rotate_secret=True)))
    return endpoint


def redeem(scope: Scope) -> Endpoint:
    """``{"code": "TW-…"}``: the code's amount is topped up once, or 404/409/410."""
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        account_id = await _account(scope, request, ctx)
        code = (await json_body(request)).get("code")
        if not isinstance(code, str) or not code.strip():
            raise InvalidRequest("code is required")
        result = await ctx.write(lambda conn: codes.redeem(conn, account_id, code, now_ms()),
                                 account_id=account_id)
        return JSONResponse(codes.redemption_view(result), status_code=201)
    return endpoint
