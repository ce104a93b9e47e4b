"""The one error shape: ``{"error": {"type", "code", "message", "param", "request_id"}}`` (request
ids are given by ``observe.ObserveMiddleware``)."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tollway.errors import TollwayError
from tollway.runtime.observe import ERROR_CODE, REQUEST_ID, error_json
from tollway.store.db import storage_error

__all__ = ["REQUEST_ID", "error_response", "http_error", "tollway_error", "unexpected_error"]

log = logging.getLogger("tollway")


def error_response(request: Request, status: int, type_: str, code: str,
                   message: str, param: str | None = None) -> Response:
    """The error body (``observe.error_json``: Anthropic's shape on ``/v1/messages``)."""
    return Response(error_json(request.url.path, request.scope.get(REQUEST_ID), status, type_,
                               code, message, param),
                    status_code=status, media_type="application/json")


async def tollway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TollwayError)
    request.scope[ERROR_CODE] = exc.code
    response = error_response(request, exc.status, exc.type, exc.code, exc.message, exc.param)
    for name, value in exc.response_headers():
        response.headers.append(name.decode(), value.decode())
    return response


#: The API's paths under /v1, as a client whose base URL lacks ``/v1`` asks for them.
_V1_PATHS = ("/chat/completions", "/completions", "/embeddings", "/messages", "/responses",
             "/images/generations", "/models", "/billing/", "/marketplace")


def missing_v1(path: str) -> bool:
    """Whether ``path`` is an API path without its ``/v1`` (a base URL set to the host)."""
    return path.startswith(_V1_PATHS)


_HTTP_CODES = {404: ("not_found_error", "not_found"),
               405: ("invalid_request_error", "method_not_allowed")}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_, code = _HTTP_CODES.get(exc.status_code, ("invalid_request_error", "invalid_request"))
    message = str(exc.detail)
    path = request.url.path
    if exc.status_code == 404:
        message = f"no route {request.method} {path}"
        if missing_v1(path):
            message += (f": did you mean /v1{path}? Set your client's base URL to "
                        f"{request.base_url}v1")
        else:
            message += ": the routes are listed at /openapi.json"
    return error_response(request, exc.status_code, type_, code, message)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    unavailable = storage_error(exc)  # a database failure on a path that did not map it
    if unavailable is not None:
        response = await tollway_error(request, unavailable)
        if request_id := request.scope.get(REQUEST_ID):
            response.headers["x-request-id"] = request_id
        return response
    # Starlette runs this handler outside the observing middleware, so the id is logged and the
    # header set here: the message promises the id finds the log line.
    request_id = request.scope.get(REQUEST_ID)
    log.exception("unhandled error in %s %s (request %s)", request.method, request.url.path,
                  request_id)
    response = error_response(request, 500, "api_error", "internal_error",
                              "internal error; the request id identifies it in the server log")
    if request_id:
        response.headers["x-request-id"] = request_id
    return response
