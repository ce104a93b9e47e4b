"""Server-side sessions for the web console: customers and the operator.

The cookie ``tollway_session`` carries a random 256-bit id; the database keeps only its
SHA-256 (``web_sessions``), with the account, an operator flag, a CSRF token and an expiry
(``session_hours``). The cookie is HttpOnly, SameSite=Lax and Secure on https. One browser
holds one session: signing in as someone else replaces it.

Forms carry the CSRF token (``csrf_token`` in every template); ``check_csrf`` compares it in
constant time. Before sign-in the token lives in its own cookie (``tollway_csrf``, double
submit), so the sign-in forms are protected too.

Pages call ``require_customer`` / ``require_operator``: they return the session or raise
``LoginRequired``, which the application answers with a redirect to the sign-in page. A
customer page must take the account id from the session, never from the URL or a form.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from tollway import settings
from tollway.clock import now_ms
from tollway.errors import CsrfFailed
from tollway.runtime.context import Context
from tollway.store import sessions as store

COOKIE = "tollway_session"
CSRF_COOKIE = "tollway_csrf"
_STATE = "tollway_session"  # request.state attribute caching the looked-up session


@dataclass(frozen=True, slots=True)
class Session:
    id: str  # the SHA-256 of the cookie value (the value itself is never kept)
    account_id: int | None
    operator: bool
    csrf_token: str


class LoginRequired(Exception):  # noqa: N818 - a control-flow signal, answered as a redirect
    """Raised by ``require_*``; answered with a 303 redirect to ``location``."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location


async def login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    return RedirectResponse(exc.location, status_code=303)


def _hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


async def current_session(request: Request) -> Session | None:
    """The request's live session (looked up once per request), or None."""
    if hasattr(request.state, _STATE):
        cached: Session | None = getattr(request.state, _STATE)
        return cached
    session = None
    cookie = request.cookies.get(COOKIE)
    if cookie and len(cookie) <= 100:
        ctx: Context = request.app.state.ctx
        row = await ctx.read(lambda conn: store.live_session(conn, _hash(cookie),
                                                             now_ms=now_ms()))
        if row is not None:
            session = Session(row.id_hash, row.account_id, row.operator, row.csrf_token)
    setattr(request.state, _STATE, session)
    return session


def _next(request: Request) -> str:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return quote(target, safe="/")


async def require_customer(request: Request) -> Session:
    session = await current_session(request)
    if session is None or session.account_id is None:
        raise LoginRequired(f"/login?next={_next(request)}")
    return session


async def require_operator(request: Request) -> Session:
    session = await current_session(request)
    if session is None or not session.operator:
        raise LoginRequired(f"/admin/login?next={_next(request)}")
    return session


def safe_next(value: str | None, default: str) -> str:
    """A redirect target from a form: a local path only (never another site)."""
    if value and value.startswith("/") and not value.startswith("//") and "\\" not in value:
        return value
    return default


def anonymous_csrf(request: Request) -> str:
    """The pre-sign-in CSRF token: the cookie's, or a new one ``render`` sets."""
    token = request.cookies.get(CSRF_COOKIE)
    if not token or len(token) > 100:
        token = getattr(request.state, "tollway_new_csrf", None) or secrets.token_urlsafe(32)
        request.state.tollway_new_csrf = token
    return token


async def check_csrf(request: Request, form: Any) -> None:
    """Refuse (403) a form whose ``csrf_token`` is not this browser's."""
    session = await current_session(request)
    expected = session.csrf_token if session else request.cookies.get(CSRF_COOKIE)
    given = form.get("csrf_token")
    if not expected or not isinstance(given, str) or not hmac.compare_digest(
            given.encode(), expected.encode()):
        raise CsrfFailed("the form is stale or came from another site; reload the page "
                         "and try again")


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_cookie(request: Request, response: Response, name: str, value: str,
               max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                        samesite="lax", secure=_secure(request))


async def start_session(request: Request, response: Response, *, account_id: int | None,
                        operator: bool) -> Session:
    """Sign in: a new session (the old one of this browser ends), its cookie on ``response``."""
    ctx: Context = request.app.state.ctx
    hours = int(settings.get("session_hours"))
    value = secrets.token_urlsafe(32)  # 256 bits
    session = Session(_hash(value), account_id, operator, secrets.token_urlsafe(32))
    old = request.cookies.get(COOKIE)
    at = now_ms()

    def write(conn: Any) -> None:
        if old:
            store.delete_session(conn, _hash(old))
        store.insert_session(conn, id_hash=session.id, account_id=account_id,
                             operator=operator, csrf_token=session.csrf_token, at_ms=at,
                             expires_at_ms=at + hours * 3_600_000)

    await ctx.write(write)
    set_cookie(request, response, COOKIE, value, hours * 3600)
    setattr(request.state, _STATE, session)
    return session


async def end_session(request: Request, response: Response) -> None:
    """Sign out: the session row is deleted (the cookie is worthless even if kept)."""
    ctx: Context = request.app.state.ctx
    cookie = request.cookies.get(COOKIE)
    if cookie:
        await ctx.write(lambda conn: store.delete_session(conn, _hash(cookie)))
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="lax",
                           secure=_secure(request))
    setattr(request.state, _STATE, None)
