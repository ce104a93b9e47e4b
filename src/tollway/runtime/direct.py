"""The application object, with a direct path for the gateway's hot routes.

Starlette serves every request through ``ServerErrorMiddleware`` → the observing middleware →
``ExceptionMiddleware`` → the router, which tries each route's regular expression in turn
(the JSON API's and the console's come first); the two outer layers each wrap ``send`` in a
closure. The gateway's routes are plain ASGI endpoints at fixed paths, so a request for one of
them (``POST /v1/chat/completions``, ...) is looked up in a dict and handed to the endpoint
under the observing middleware alone, with a small guard that answers what the exception
layers would have answered: a ``TollwayError`` that escaped the endpoint becomes its JSON
error, anything else the 500 ``internal_error`` (503 ``storage_unavailable`` for a database
failure) and is re-raised for the server's log, as ``ServerErrorMiddleware`` does. Every other
request (pages, the API, a path with parameters, HEAD, a trailing slash) takes Starlette's way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from tollway.errors import TollwayError
from tollway.runtime.errors import tollway_error, unexpected_error
from tollway.runtime.observe import RESPONSE_STARTED, ObserveMiddleware


class TollwayApp(Starlette):
    def __init__(self, *, direct_routes: Sequence[BaseRoute], max_inflight: int,
                 log_requests: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: path -> (route, methods served directly)
        self.direct: dict[str, tuple[Route, frozenset[str]]] = {
            route.path: (route, frozenset(route.methods or ()) - {"HEAD"})
            for route in direct_routes
            if isinstance(route, Route) and not route.param_convertors}
        self._direct_stack = ObserveMiddleware(self._guarded, max_inflight=max_inflight,
                                               log_requests=log_requests)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            found = self.direct.get(scope["path"])
            if found is not None and scope["method"] in found[1]:
                route = found[0]
                scope["app"] = self
                scope["route"] = route
                scope["endpoint"] = route.endpoint
                scope["path_params"] = {}
                await self._direct_stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = scope["endpoint"]
        try:
            await endpoint(scope, receive, send)
        except TollwayError as exc:
            if scope.get(RESPONSE_STARTED):
                raise
            await (await tollway_error(Request(scope), exc))(scope, receive, send)
        except Exception as exc:
            if not scope.get(RESPONSE_STARTED):
                response = await unexpected_error(Request(scope), exc)
                del response.headers["x-request-id"]  # the observing middleware adds it
                await response(scope, receive, send)
            raise
