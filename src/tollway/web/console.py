"""The customer console: overview, keys, usage log and statements of the signed-in account.

Every page takes the account id from the session (``require_customer``), never from the URL
or a form, and reads through the same billing/store functions as the JSON API.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tollway.web.auth import auth_routes
from tollway.web.pages import render
from tollway.web.session import require_customer


async def overview(request: Request) -> Response:
    await require_customer(request)
    return await render(request, "console/overview.html", {})


console_routes: list[BaseRoute] = [
    *auth_routes,
    Route("/console", overview),
]
