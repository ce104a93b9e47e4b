"""The one plain-ASGI middleware every request passes: its id, load shedding, metrics and the
access log.

- Every request gets an id, answered in ``X-Request-Id`` (and ``request-id`` on Anthropic's
  routes, where the ``anthropic`` package reads it).
- Beyond ``max_inflight_requests`` requests in flight in this worker, a request is refused at
  once with 503 ``overloaded`` and ``Retry-After`` — before its body is read or the database
  is touched, so shedding costs almost nothing and charges nothing. ``/metrics`` is never
  shed (an operator must see the overload).
- When the response is over: the request counter and latency histogram by route, product and
  status, and one access-log line (request id, method, route, status, duration, account,
  product, cost) for every request or only for errors (``log_requests``). Headers and bodies
  are never logged: no key or token can leak there.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tollway import tracing
from tollway.errors import Overloaded
from tollway.metrics import METRICS
from tollway.money import format_usd
from tollway.runtime.paths import is_page_path

REQUEST_ID = "tollway.request_id"
#: What the gateway learns about a request, for the metrics and the log (set on the scope).
PRODUCT = "tollway.product"
ACCOUNT = "tollway.account_id"
COST = "tollway.cost_nano"
ERROR_CODE = "tollway.error_code"
#: Set once the response's headers are sent (an error can then no longer be answered).
RESPONSE_STARTED = "tollway.response_started"
UNMATCHED = "(unmatched)"
LOG_REQUESTS = {"all": 0, "errors": 400, "none": 1000}

access_log = logging.getLogger("tollway.access")


#: A request id is this worker's random prefix and a counter: unique without reading
#: ``os.urandom`` per request (a system call that gives up the GIL, and under load waits for
#: the writer thread to hand it back: 16 % of the event loop's time in the profile).
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(secrets.randbelow(1 << 32))


#: Tollway's error types (OpenAI's vocabulary) as Anthropic names them.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    402: "billing_error", 403: "permission_error", 404: "not_found_error",
                    405: "invalid_request_error", 409: "invalid_request_error",
                    413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
                    504: "timeout_error"}


def is_anthropic(path: str) -> bool:
    """Anthropic's routes, whose every refusal reads in Anthropic's error shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_json(path: str, request_id: str | None, status: int, type_: str, code: str,
               message: str, param: str | None = None) -> bytes:
    """The one error body: ``{"error": {"type", "code", "message", "param", "request_id"}}``
    (OpenAI's shape plus Tollway's ``request_id``), or on Anthropic's routes Anthropic's, with
    Tollway's ``code`` and ``request_id`` beside, so each client library raises its own
    exception types::

        {"type": "error", "error": {"type": "authentication_error", "message": "...",
                                    "code": "invalid_api_key", "request_id": "req_..."},
         "request_id": "req_..."}
    """
    if is_anthropic(path):
        return json.dumps({"type": "error", "error": {
            "type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message,
            "code": code, "request_id": request_id}, "request_id": request_id}).encode()
    return json.dumps({"error": {"type": type_, "code": code, "message": message,
                                 "param": param, "request_id": request_id}}).encode()


def new_request_id() -> str:
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, *, max_inflight: int, log_requests: str) -> None:
        """``log_requests``: ``all``, ``errors`` (answers >= 400) or ``none``."""
        if log_requests not in LOG_REQUESTS:
            raise ValueError(f"TOLLWAY_LOG_REQUESTS must be one of {', '.join(LOG_REQUESTS)}, "
                             f"got {log_requests!r}")
        self.app = app
        self.max_inflight = max_inflight
        #: the lowest status that is logged (a line costs tens of µs: off the hot path unless
        #: asked for)
        self.log_from = LOG_REQUESTS[log_requests]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope[REQUEST_ID] = request_id
        header = (b"x-request-id", request_id.encode())
        # Anthropic's routes also answer ``request-id`` (what the ``anthropic`` package reads)
        ids = [header, (b"request-id", header[1])] if is_anthropic(scope["path"]) else [header]
        started = time.monotonic()
        metrics = METRICS
        if metrics.inflight >= self.max_inflight and scope["path"] != "/metrics":
            metrics.shed += 1
            await _shed(scope, send, ids)
            self._done(scope, 503, started)
            return
        status = 500
        metrics.inflight += 1

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                scope[RESPONSE_STARTED] = True
                message["headers"] = [*message.get("headers", []), *ids]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics.inflight -= 1
            self._done(scope, status, started)

    def _done(self, scope: Scope, status: int, started: float) -> None:
        seconds = time.monotonic() - started
        route = _route(scope)
        product = scope.get(PRODUCT) or ""
        METRICS.request(route, product, status, seconds)
        trace = scope.get(tracing.SCOPE_KEY)
        if trace is not None:
            trace.finish(status)
        if scope.get(ERROR_CODE) == "storage_unavailable":
            METRICS.storage_unavailable += 1
        if status >= self.log_from and access_log.isEnabledFor(logging.INFO):
            cost = scope.get(COST)
            access_log.info(
                "%s %s %d %.1fms", scope["method"], route, status, seconds * 1000,
                extra={"request_id": scope.get(REQUEST_ID), "method": scope["method"],
                       "route": route, "path": scope["path"], "status": status,
                       "duration_ms": round(seconds * 1000, 1),
                       "account_id": scope.get(ACCOUNT), "product": product or None,
                       "cost_usd": format_usd(cost) if cost is not None else None,
                       "error_code": scope.get(ERROR_CODE)})


def _route(scope: Scope) -> str:
    """The route's template (``/apis/v1/{path:path}``), never the raw path: bounded labels.
    Routes under a mount (the admin API) are relative to it."""
    path = getattr(scope.get("route"), "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    mount = scope.get("root_path") or ""
    return mount + path if mount and not path.startswith(mount) else path


_SHED_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Busy — Tollway</title></head>
<body><h1>503 — busy</h1><p>{message}</p><p>Request id: <code>{request_id}</code></p>
</body></html>
"""


async def _shed(scope: Scope, send: Send, ids: list[tuple[bytes, bytes]]) -> None:
    """503 ``overloaded``: the API's JSON error (Anthropic's shape on its routes), or on page
    paths a small HTML page (no template and no session: shedding must stay cheap)."""
    exc = Overloaded("this server is at its limit of requests in flight; retry shortly")
    scope[ERROR_CODE] = exc.code
    if is_page_path(scope["path"]):
        body = _SHED_PAGE.format(message="This server is at its limit right now. Try again "
                                 "in a moment.", request_id=scope[REQUEST_ID]).encode()
        content_type = b"text/html; charset=utf-8"
    else:
        body = error_json(scope["path"], scope[REQUEST_ID], exc.status, exc.type, exc.code,
                          exc.message)
        content_type = b"application/json"
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", content_type), (b"cache-control", b"no-store"),
                            (b"content-length", str(len(body)).encode()),
                            *exc.response_headers(), *ids]})
    await send({"type": "http.response.body", "body": body})
