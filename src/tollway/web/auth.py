"""Sign-in pages: customers at ``/login`` (email or account name + password), the operator
at ``/admin/login`` (the admin token), optional self-service ``/signup``; sign-out by POST."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from tollway import settings
from tollway.billing import grants, logins, signin
from tollway.billing.views import parse_amount
from tollway.errors import InvalidRequest
from tollway.runtime.context import Context
from tollway.runtime.http import client_address, form_data
from tollway.web.pages import render
from tollway.web.session import (
    check_csrf,
    current_session,
    end_session,
    safe_next,
    start_session,
)

REFUSED = "That login and password do not match an active account."


async def _throttled(request: Request, page: str, retry_after_s: int,
                     context: dict[str, Any]) -> Response:
    """The sign-in page again, refused with 429 and ``Retry-After`` (the throttle)."""
    minutes = -(-retry_after_s // 60)
    error = (f"Too many failed sign-ins. Try again in {minutes} minute"
             f"{'' if minutes == 1 else 's'}.")
    response = await render(request, page, {**context, "error": error}, status=429)
    response.headers["retry-after"] = str(retry_after_s)
    return response


async def _claim(request: Request, scopes: list[str],
                 policy: signin.Policy) -> signin.Claim | int:
    """Check and count this attempt in one write (``signin.claim``): the attempt, or the
    seconds to wait when one of ``scopes`` is throttled."""
    ctx: Context = request.app.state.ctx
    at = ctx.clock()
    result: signin.Claim | int = await ctx.write(
        lambda conn: signin.claim(conn, scopes, policy, now_ms=at))
    return result


def _client_scopes(request: Request) -> list[str]:
    ctx: Context = request.app.state.ctx
    return signin.ip_scope(client_address(request.scope, ctx.trusted_proxies))


def _text(form: Any, name: str, limit: int = 1024) -> str:
    value = form.get(name)
    return value[:limit] if isinstance(value, str) else ""


def signup_enabled() -> bool:
    return settings.get("signup_enabled").strip().lower() in ("1", "true", "yes", "on")


async def login(request: Request) -> Response:
    nxt = safe_next(request.query_params.get("next"), "/console")
    if request.method == "GET":
        session = await current_session(request)
        if session is not None and session.account_id is not None:
            return RedirectResponse(nxt, status_code=303)
        return await render(request, "auth/login.html",
                            {"next": nxt, "error": None, "login": "",
                             "signup": signup_enabled()})
    form = await form_data(request)
    await check_csrf(request, form)
    nxt = safe_next(_text(form, "next"), "/console")
    login_name, password = _text(form, "login", 320), _text(form, "password")
    ctx: Context = request.app.state.ctx
    policy = signin.Policy.from_settings()
    scopes = [signin.login_scope(login_name), *_client_scopes(request)]
    claim = await _claim(request, scopes, policy)
    if isinstance(claim, int):  # refused before scrypt: a guesser gets no password check
        return await _throttled(request, "auth/login.html", claim,
                                {"next": nxt, "login": login_name, "signup": signup_enabled()})
    account = await ctx.read(lambda conn: logins.authenticate(conn, login_name, password))
    if account is None:  # the claimed attempt stays counted: a failure
        return await render(request, "auth/login.html",
                            {"next": nxt, "error": REFUSED, "login": login_name,
                             "signup": signup_enabled()}, status=401)
    await ctx.write(lambda conn: signin.succeeded(conn, claim, login_name))
    response = RedirectResponse(nxt, status_code=303)
    await start_session(request, response, account_id=account.id, operator=False)
    return response


def sign_out(then: str) -> Callable[[Request], Awaitable[Response]]:
    """A sign-out endpoint (POST with the CSRF token) that sends the browser to ``then``."""
    async def endpoint(request: Request) -> Response:
        form = await form_data(request)
        await check_csrf(request, form)
        response = RedirectResponse(then, status_code=303)
        await end_session(request, response)
        return response
    return endpoint


async def admin_login(request: Request) -> Response:
    nxt = safe_next(request.query_params.get("next"), "/admin")
    if request.method == "GET":
        return await render(request, "auth/admin_login.html", {"next": nxt, "error": None})
    form = await form_data(request)
    await check_csrf(request, form)
    nxt = safe_next(_text(form, "next"), "/admin")
    ctx: Context = request.app.state.ctx
    policy = signin.Policy.from_settings()
    scopes = _client_scopes(request)  # one operator: its form counts by client address only
    claim = await _claim(request, scopes, policy)
    if isinstance(claim, int):
        return await _throttled(request, "auth/admin_login.html", claim, {"next": nxt})
    token = _text(form, "token")
    if not token or not ctx.admin_token or not hmac.compare_digest(
            token.encode(), ctx.admin_token.encode()):
        return await render(request, "auth/admin_login.html",
                            {"next": nxt, "error": "That is not the admin token."}, status=401)
    await ctx.write(lambda conn: signin.succeeded(conn, claim, None))
    response = RedirectResponse(nxt, status_code=303)
    await start_session(request, response, account_id=None, operator=True)
    return response


async def signup(request: Request) -> Response:
    if not signup_enabled():
        return await render(request, "error.html", {
            "status": 404, "message": "Self-service sign-up is not enabled on this server; "
            "ask the operator for an account."}, status=404)
    if request.method == "GET":
        return await render(request, "auth/signup.html",
                            {"error": None, "name": "", "email": ""})
    form = await form_data(request)
    await check_csrf(request, form)
    name, email = _text(form, "name", 200).strip(), _text(form, "email", 320).strip()
    password = _text(form, "password")
    ctx: Context = request.app.state.ctx
    # every sign-up attempt counts against its address (before scrypt or any account)
    scope = signin.signup_scope(client_address(request.scope, ctx.trusted_proxies))
    claim = await _claim(request, scope, signin.Policy.signup_from_settings())
    if isinstance(claim, int):
        minutes = -(-claim // 60)
        refused = await render(request, "auth/signup.html", {
            "error": f"Too many sign-ups from this address. Try again in {minutes} minute"
                     f"{'' if minutes == 1 else 's'}.", "name": name, "email": email},
            status=429)
        refused.headers["retry-after"] = str(claim)
        return refused
    try:
        if not email:
            raise InvalidRequest("an email address is needed to sign in")
        password_hash = logins.hash_password(password)  # scrypt runs here, not in the writer
        credit_nano, credit_days = _signup_credit()
        for attempt in range(2):
            # the same form submitted twice finds the account the first submit made
            found = await ctx.read(lambda conn: logins.authenticate(conn, email, password))
            if found is not None and found.name == name:
                account_id = found.id
                break
            try:
                account_id = (await ctx.write(lambda conn: logins.create_account(
                    conn, name, "default", email=email, password_hash=password_hash))).id
                break
            except InvalidRequest:
                if attempt:
                    raise
        if credit_nano:  # once per account, whatever the number of submits
            await ctx.write(lambda conn: grants.signup_credit(
                conn, account_id, credit_nano, days=credit_days, at_ms=ctx.clock()),
                account_id=account_id)
    except InvalidRequest as exc:
        return await render(request, "auth/signup.html",
                            {"error": exc.message, "name": name, "email": email}, status=400)
    response = RedirectResponse("/console", status_code=303)
    await start_session(request, response, account_id=account_id, operator=False)
    return response


def _signup_credit() -> tuple[int, int]:
    """(nano-USD, days valid; 0: for ever) of the promotional credit a sign-up gets."""
    value = settings.get("signup_credit_usd").strip()
    if value in ("", "0") or value.strip("0.") == "":
        return 0, 0
    days = settings.get("signup_credit_days").strip() or "0"
    if not days.isdigit() or not 0 <= int(days) <= 36500:
        raise InvalidRequest(f"TOLLWAY_SIGNUP_CREDIT_DAYS must be a whole number of days, "
                             f"got {days!r}")
    return parse_amount(value, what="TOLLWAY_SIGNUP_CREDIT_USD"), int(days)


auth_routes: list[BaseRoute] = [
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", sign_out("/login"), methods=["POST"]),
    Route("/signup", signup, methods=["GET", "POST"]),
    Route("/admin/login", admin_login, methods=["GET", "POST"]),
    Route("/admin/logout", sign_out("/admin/login"), methods=["POST"]),
]
