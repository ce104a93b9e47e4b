"""Operator routes: accounts and their tiers, top-ups, adjustments, keys and their limits,
ledger verification.

Every route takes ``Authorization: Bearer <admin token>``. Money moves through the ledger in
the writer's batches; ``Idempotency-Key`` (header) makes a top-up or adjustment safe to retry.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.engine import Connection
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tollway import clock
from tollway.api import channels, notifications, payments, reports
from tollway.billing import auto_recharge, codes, credits, grants, logins, tiers
from tollway.billing import keys as key_ops
from tollway.billing.views import (
    LIMIT_FIELDS,
    account_view,
    credit_view,
    key_view,
    parse_amount,
    parse_iso_ms,
    parse_key_limits,
    parse_signed_amount,
)
from tollway.errors import InvalidAdminToken, InvalidRequest
from tollway.ledger.verify import verify
from tollway.runtime import queries
from tollway.runtime.context import Context
from tollway.runtime.http import bearer, json_body, optional_str, path_int
from tollway.store import accounts as store

Endpoint = Callable[[Request], Awaitable[Response]]


def _check_admin(request: Request, ctx: Context) -> None:
    token = bearer(request)
    if not token or not ctx.admin_token or not hmac.compare_digest(
            token.encode(), ctx.admin_token.encode()):
        raise InvalidAdminToken("admin routes need 'Authorization: Bearer <admin token>'")


def _admin(handler: Callable[[Request, Context], Awaitable[Response]]) -> Endpoint:
    async def endpoint(request: Request) -> Response:
        ctx: Context = request.app.state.ctx
        _check_admin(request, ctx)
        return await handler(request, ctx)

    return endpoint


async def admin_scope(request: Request, ctx: Context) -> int | None:
    """Reports for the account in the path or ``?account=`` (id or name); none: all."""
    _check_admin(request, ctx)
    ref = request.path_params.get("account") or request.query_params.get("account")
    if not ref:
        return None
    return (await ctx.read(lambda conn: store.find_account(conn, ref))).id


def _idempotency_key(request: Request) -> str:
    key = request.headers.get("idempotency-key", "").strip()
    if len(key) > 200:
        raise InvalidRequest("Idempotency-Key must be at most 200 characters")
    return key or secrets.token_hex(16)


async def list_accounts(request: Request, ctx: Context) -> Response:
    rows = await ctx.read(store.list_accounts)
    return JSONResponse({"object": "list", "data": [account_view(a) for a in rows]})


async def create_account(request: Request, ctx: Context) -> Response:
    body = await json_body(request)
    name = optional_str(body, "name")
    if not name:
        raise InvalidRequest("name is required")
    group = optional_str(body, "group") or "default"
    email, password = optional_str(body, "email"), optional_str(body, "password")
    password_hash = None if password is None else logins.hash_password(password)
    account = await ctx.write(lambda conn: logins.create_account(
        conn, name, group, email=email, password_hash=password_hash))
    return JSONResponse(account_view(account), status_code=201)


async def disable_account(request: Request, ctx: Context) -> Response:
    ref = request.path_params["account"]
    account = await ctx.write(
        lambda conn: logins.disable_account(conn, store.find_account(conn, ref).id))
    return JSONResponse(account_view(account))


async def enable_account(request: Request, ctx: Context) -> Response:
    ref = request.path_params["account"]
    account = await ctx.write(
        lambda conn: logins.enable_account(conn, store.find_account(conn, ref).id))
    return JSONResponse(account_view(account))


async def get_account(request: Request, ctx: Context) -> Response:
    ref = request.path_params["account"]
    account = await ctx.read(lambda conn: store.find_account(conn, ref))
    return JSONResponse(account_view(account))


async def topup(request: Request, ctx: Context) -> Response:
    body = await json_body(request)
    return await _credit(request, ctx, "topup", parse_amount(body.get("amount_usd")),
                         optional_str(body, "note"))


async def adjust(request: Request, ctx: Context) -> Response:
    body = await json_body(request)
    amount = parse_signed_amount(body.get("amount_usd"))
    note = optional_str(body, "note")
    if not note:
        raise InvalidRequest("note is required: say why the balance is adjusted")
    return await _credit(request, ctx, "adjustment", amount, note)


async def _credit(request: Request, ctx: Context, kind: str, amount: int,
                  note: str | None) -> Response:
    key = _idempotency_key(request)
    # the account is looked up first so the write is ordered by it like every other money
    # write (see store/writer.py: writers lock accounts in one order, so never deadlock)
    account = await ctx.read(lambda conn: store.find_account(conn, request.path_params["account"]))
    _, result = await ctx.write(lambda conn: credits.credit(
        conn, account.id, amount, kind=kind, idempotency_key=key, note=note,
        at_ms=ctx.clock()),
        account_id=account.id)
    return JSONResponse(credit_view(result), status_code=201)


async def list_keys(request: Request, ctx: Context) -> Response:
    ref = request.path_params["account"]

    def load(conn: Connection) -> list[dict[str, Any]]:
        return [key_view(k) for k in store.list_keys(conn, store.find_account(conn, ref).id)]

    return JSONResponse({"object": "list", "data": await ctx.read(load)})


async def create_key(request: Request, ctx: Context) -> Response:
    body = await json_body(request)
    models = body.get("models")
    if models is not None and (not isinstance(models, list)
                               or not all(isinstance(m, str) for m in models)):
        raise InvalidRequest("models must be a list of catalog ids")
    quota = body.get("quota_usd")
    quota_nano = None if quota is None else parse_amount(quota, what="quota_usd")
    expires = optional_str(body, "expires_at")
    expires_ms = None if expires is None else parse_iso_ms(expires, what="expires_at")
    name, group = optional_str(body, "name"), optional_str(body, "group")
    limits = parse_key_limits(body)
    ref = request.path_params["account"]

    def op(conn: Connection) -> dict[str, Any]:
        account = store.find_account(conn, ref)
        new = key_ops.create_key(conn, account.id, at_ms=clock.now_ms(), name=name,
                                 group=group, models=models, quota_nano=quota_nano,
                                 expires_at_ms=expires_ms, limits=limits)
        return key_view(new.record, secret=new.secret)

    return JSONResponse(await ctx.write(op), status_code=201)


async def update_key(request: Request, ctx: Context) -> Response:
    """Change a key's limits: the fields given replace the key's, null clears one.
    ``group`` pins the key to a price group (null: the account's group)."""
    key_id = path_int(request, "key_id")
    body = await json_body(request)
    if unknown := sorted(set(body) - {*LIMIT_FIELDS, "group"}):
        raise InvalidRequest(f"unknown fields {', '.join(unknown)} (a key's limits are "
                             f"{', '.join(LIMIT_FIELDS)}; its price group is group)")
    pin = "group" in body
    group = optional_str(body, "group") if pin else None
    limit_values = {k: v for k, v in body.items() if k != "group"}

    def op(conn: Connection) -> dict[str, Any]:
        record = store.get_key(conn, key_id)
        if pin:
            record = key_ops.pin_group(conn, key_id, group, at_ms=clock.now_ms())
        if limit_values or not pin:
            record = key_ops.set_limits(conn, key_id,
                                        parse_key_limits(limit_values, record.limits))
        return key_view(record)

    return JSONResponse(await ctx.write(op))


async def set_tier(request: Request, ctx: Context) -> Response:
    body = await json_body(request)
    tier = optional_str(body, "tier")
    ref = request.path_params["account"]
    return JSONResponse(account_view(await ctx.write(lambda conn: tiers.set_tier(conn, ref,
                                                                                 tier))))


async def revoke_key(request: Request, ctx: Context) -> Response:
    key_id = path_int(request, "key_id")
    record = await ctx.write(lambda conn: key_ops.revoke_key(conn, key_id,
                                                             at_ms=clock.now_ms()))
    return JSONResponse(key_view(record))


async def create_codes(request: Request, ctx: Context) -> Response:
    """Mint ``count`` codes worth ``amount_usd`` (promotional credit, valid
    ``credit_expires_days`` after each redemption if given): the codes are in this answer
    only."""
    body = await json_body(request)
    amount = parse_amount(body.get("amount_usd"))
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool):
        raise InvalidRequest("count must be a whole number")
    expires = optional_str(body, "expires_at")
    expires_ms = None if expires is None else parse_iso_ms(expires, what="expires_at")
    note = optional_str(body, "note")
    days = body.get("credit_expires_days")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool)):
        raise InvalidRequest("credit_expires_days must be a whole number of days")
    minted = await ctx.write(lambda conn: codes.mint(
        conn, amount, count=count, at_ms=clock.now_ms(), expires_at_ms=expires_ms, note=note,
        credit_days=days))
    return JSONResponse({"object": "list", "data": [codes.new_code_view(c) for c in minted]},
                        status_code=201)


async def list_codes(request: Request, ctx: Context) -> Response:
    limit = queries.query_int(request, "limit", default=100, high=1000) or 100
    cursor = queries.query_int(request, "cursor")
    status = request.query_params.get("status") or None
    return JSONResponse(await ctx.read(lambda conn: codes.page(
        conn, limit=limit, cursor=cursor, status=status, now_ms=clock.now_ms())))


async def revoke_code(request: Request, ctx: Context) -> Response:
    code_id = path_int(request, "code_id")
    return JSONResponse(await ctx.write(lambda conn: codes.revoke(conn, code_id,
                                                                  at_ms=clock.now_ms())))


async def add_grant(request: Request, ctx: Context) -> Response:
    """``{"amount_usd", "reason", "expires_at"?}``: promotional credit, spent first."""
    body = await json_body(request)
    amount = parse_amount(body.get("amount_usd"))
    expires = optional_str(body, "expires_at")
    expires_ms = None if expires is None else parse_iso_ms(expires, what="expires_at")
    reason = optional_str(body, "reason") or ""
    key = _idempotency_key(request)
    account = await ctx.read(lambda conn: store.find_account(conn, request.path_params["account"]))
    return JSONResponse(await ctx.write(lambda conn: grants.add(
        conn, account.id, amount, reason=reason, expires_at_ms=expires_ms,
        at_ms=ctx.clock(), idempotency_key=key), account_id=account.id), status_code=201)


async def list_grants(request: Request, ctx: Context) -> Response:
    ref = request.path_params["account"]
    account = await ctx.read(lambda conn: store.find_account(conn, ref))
    return JSONResponse(await ctx.write(lambda conn: grants.listing(
        conn, account.id, at_ms=ctx.clock()), account_id=account.id))


async def recharge_overview(request: Request, ctx: Context) -> Response:
    """Every account's auto-recharge: setting, saved card, failures, pause, last attempts."""
    return JSONResponse({"object": "list", "data": await ctx.read(
        lambda conn: auto_recharge.overview(conn, at_ms=ctx.clock()))})


async def verify_ledger(request: Request, ctx: Context) -> Response:
    problems = await ctx.read(verify)
    return JSONResponse({"ok": not problems, "problems": problems},
                        status_code=200 if not problems else 500)


admin_routes = [
    Route("/accounts", _admin(list_accounts), methods=["GET"]),
    Route("/accounts", _admin(create_account), methods=["POST"]),
    Route("/accounts/{account}", _admin(get_account), methods=["GET"]),
    Route("/accounts/{account}/disable", _admin(disable_account), methods=["POST"]),
    Route("/accounts/{account}/enable", _admin(enable_account), methods=["POST"]),
    Route("/accounts/{account}/topups", _admin(topup), methods=["POST"]),
    Route("/accounts/{account}/adjustments", _admin(adjust), methods=["POST"]),
    Route("/accounts/{account}/keys", _admin(list_keys), methods=["GET"]),
    Route("/accounts/{account}/keys", _admin(create_key), methods=["POST"]),
    Route("/accounts/{account}/tier", _admin(set_tier), methods=["PUT"]),
    Route("/keys/{key_id}", _admin(update_key), methods=["PATCH"]),
    Route("/keys/{key_id}/revoke", _admin(revoke_key), methods=["POST"]),
    Route("/ledger/verify", _admin(verify_ledger), methods=["GET"]),
    Route("/channels", _admin(channels.list_channels), methods=["GET"]),
    Route("/channels/{channel_id:path}", _admin(channels.put_channel), methods=["PUT"]),
    Route("/margin", _admin(channels.margin), methods=["GET"]),
    Route("/usage", reports.usage_list(admin_scope, operator=True), methods=["GET"]),
    Route("/usage/export", queries.usage_export(admin_scope), methods=["GET"]),
    Route("/usage/{request_id}", reports.usage_one(admin_scope, operator=True),
          methods=["GET"]),
    Route("/summary", reports.summary(admin_scope), methods=["GET"]),
    Route("/accounts/{account}/summary", reports.summary(admin_scope), methods=["GET"]),
    Route("/accounts/{account}/statement", reports.statement(admin_scope), methods=["GET"]),
    Route("/accounts/{account}/notifications", notifications.events(admin_scope),
          methods=["GET"]),
    Route("/accounts/{account}/notifications/settings", notifications.get_settings(admin_scope),
          methods=["GET"]),
    Route("/accounts/{account}/notifications/settings", notifications.put_settings(admin_scope),
          methods=["PUT"]),
    Route("/accounts/{account}/notifications/settings/rotate-secret",
          notifications.rotate_secret(admin_scope), methods=["POST"]),
    *payments.recharge_routes("/accounts/{account}/auto_recharge", admin_scope),
    Route("/auto_recharge", _admin(recharge_overview), methods=["GET"]),
    Route("/accounts/{account}/grants", _admin(add_grant), methods=["POST"]),
    Route("/accounts/{account}/grants", _admin(list_grants), methods=["GET"]),
    Route("/codes", _admin(create_codes), methods=["POST"]),
    Route("/codes", _admin(list_codes), methods=["GET"]),
    Route("/codes/{code_id}/revoke", _admin(revoke_code), methods=["POST"]),
]
