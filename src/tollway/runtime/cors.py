"""CORS for browser clients, when the operator lists their origins (``TOLLWAY_CORS_ORIGINS``).

Starlette's ``CORSMiddleware`` is plain ASGI (no ``BaseHTTPMiddleware``): it answers preflight
``OPTIONS`` requests itself and adds ``Access-Control-Allow-Origin`` to the rest. It is the
outermost layer, so refusals (401, 402, 429, 503) carry the headers too and a browser can
read them. Tollway's own headers are exposed to scripts: the cost, the request ids, the
rate limits. Credentials (cookies) are not allowed: API calls carry their key in a header.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

EXPOSED = ["x-request-id", "request-id", "x-tollway-cost-usd", "x-tollway-max-tokens",
           "x-tollway-replayed", "x-tollway-replayed-request-id", "x-tollway-upstream-error",
           "retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
           "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
           "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]


def middleware(origins: list[str]) -> Middleware:
    return Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                      allow_headers=["*"], expose_headers=EXPOSED, max_age=600)
