"""Plain-ASGI helpers for the hot path."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from starlette.types import Receive, Scope, Send

from tollway.errors import InvalidRequest, PayloadTooLarge, TollwayError
from tollway.gateway import jsonio
from tollway.runtime.observe import ERROR_CODE, REQUEST_ID, error_json

JSON = b"application/json"


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidRequest("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def json_object(body: bytes) -> dict[str, Any]:
    try:
        value = jsonio.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return value


def stream_flag(payload: dict[str, Any]) -> bool:
    """The request's ``stream`` flag, which must be a JSON boolean: an upstream may read any
    truthy value as "stream" while the gateway expected one JSON answer (and answered 502), so
    anything else is refused before holding anything."""
    value = payload.get("stream")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest("stream must be true or false")
    return value


async def send_bytes(send: Send, status: int, body: bytes, content_type: bytes = JSON,
                     headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def error_body(scope: Scope, exc: TollwayError) -> bytes:
    scope[ERROR_CODE] = exc.code
    return error_json(scope["path"], scope.get(REQUEST_ID), exc.status, exc.type, exc.code,
                      exc.message, exc.param)


async def send_error(scope: Scope, send: Send, exc: TollwayError,
                     headers: Iterable[tuple[bytes, bytes]] = (),
                     render: Callable[[Scope, TollwayError], bytes] = error_body) -> None:
    """An error response (its body as ``render`` writes it: Anthropic's shape on
    /v1/messages) with the error's own headers (rate limits) and its Retry-After (a limit
    that resets by itself, a 503 that goes away)."""
    scope[ERROR_CODE] = exc.code
    await send_bytes(send, exc.status, render(scope, exc),
                     headers=[*headers, *exc.response_headers()])
