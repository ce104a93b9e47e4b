"""Request ids and the one error shape: ``{"error": {"type", "code", "message",
"request_id"}}``. Plain ASGI, so it costs nothing on the hot path."""

from __future__ import annotations

import logging
import secrets

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway.errors import TollwayError
from tollway.store.db import storage_error

log = logging.getLogger("tollway")
REQUEST_ID = "tollway.request_id"


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class RequestIdMiddleware:
    """Give every request an id and answer it in ``X-Request-Id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope[REQUEST_ID] = request_id
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def error_response(request: Request, status: int, type_: str, code: str,
                   message: str) -> JSONResponse:
    body = {"error": {"type": type_, "code": code, "message": message,
                      "request_id": request.scope.get(REQUEST_ID)}}
    return JSONResponse(body, status_code=status)


async def tollway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TollwayError)
    response = error_response(request, exc.status, exc.type, exc.code, exc.message)
    if exc.retry_after_s is not None:
        response.headers["retry-after"] = str(exc.retry_after_s)
    return response


_HTTP_CODES = {404: ("not_found_error", "not_found"),
               405: ("invalid_request_error", "method_not_allowed")}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_, code = _HTTP_CODES.get(exc.status_code, ("invalid_request_error", "invalid_request"))
    return error_response(request, exc.status_code, type_, code, str(exc.detail))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    unavailable = storage_error(exc)  # a database failure on a path that did not map it
    if unavailable is not None:
        response = await tollway_error(request, unavailable)
        if request_id := request.scope.get(REQUEST_ID):
            response.headers["x-request-id"] = request_id
        return response
    # Starlette runs this handler outside RequestIdMiddleware, so the id is logged and the
    # header set here: the message promises the id finds the log line.
    request_id = request.scope.get(REQUEST_ID)
    log.exception("unhandled error in %s %s (request %s)", request.method, request.url.path,
                  request_id)
    response = error_response(request, 500, "api_error", "internal_error",
                              "internal error; the request id identifies it in the server log")
    if request_id:
        response.headers["x-request-id"] = request_id
    return response
