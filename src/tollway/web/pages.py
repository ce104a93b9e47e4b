"""Server-rendered pages: the Jinja2 environment, ``render`` and the static files.

Every template extends ``base.html`` (blocks ``title`` and ``content``) and receives
``session`` (the signed-in ``Session`` or None), ``request_id`` (error pages show it) and
``csrf_token`` (put it in every form as
``<input type="hidden" name="csrf_token" value="{{ csrf_token }}">``). Autoescape is on.
Static assets are vendored in ``web/static`` and served at ``/static``: nothing from a CDN.

Errors raised while serving a page (a 404, a refused CSRF token) are answered as an HTML page
instead of the API's JSON error body: ``is_page`` tells which paths are pages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from tollway.runtime.observe import REQUEST_ID
from tollway.runtime.paths import is_page_path
from tollway.web.session import CSRF_COOKIE, anonymous_csrf, current_session, set_cookie

HERE = Path(__file__).parent
templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    trim_blocks=True,
    lstrip_blocks=True,
    undefined=jinja2.StrictUndefined,
)
static_mount = Mount("/static", StaticFiles(directory=HERE / "static"), name="static")

def is_page(request: Request) -> bool:
    return is_page_path(request.url.path)


async def render(request: Request, name: str, context: dict[str, Any] | None = None,
                 status: int = 200) -> HTMLResponse:
    """The template ``name`` as an HTML response, with ``session`` and ``csrf_token``."""
    session = await current_session(request)
    csrf = session.csrf_token if session else anonymous_csrf(request)
    body = templates.get_template(name).render(
        {**(context or {}), "session": session, "csrf_token": csrf, "path": request.url.path,
         "request_id": request.scope.get(REQUEST_ID)})
    response = HTMLResponse(body, status_code=status, headers={
        "cache-control": "no-store", "x-frame-options": "DENY",
        "referrer-policy": "same-origin", "x-content-type-options": "nosniff"})
    if session is None and request.cookies.get(CSRF_COOKIE) != csrf:
        set_cookie(request, response, CSRF_COOKIE, csrf, None)
    return response


async def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    """The error as a page, with its request id (the same one as ``X-Request-Id`` and the
    access log: what a customer quotes to the operator)."""
    return await render(request, "error.html", {"status": status, "message": message},
                        status=status)
