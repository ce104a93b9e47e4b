"""The baseline hop for ``bench/gateway.py``: a bare pass-through proxy on Tollway's own stack.

    python bench/passthrough.py --upstream http://127.0.0.1:PORT [--host H] [--port P]

One Starlette route (``POST /v1/{path}``) on uvicorn with uvloop and httptools, one shared
aiohttp ``ClientSession`` (pooled connections, like ``tollway.upstreams.registry``). No auth, no
parsing, no billing: the request body is forwarded as bytes with its content type; the upstream's
status and content type come back; an ``text/event-stream`` answer is streamed through chunk by
chunk as it arrives, anything else is read whole and returned. This is the floor a Python
gateway on this stack cannot go below, so Tollway's figures are read as ratios to it.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


def create_app(upstream: str) -> Starlette:
    base = upstream.rstrip("/")
    state: dict[str, aiohttp.ClientSession] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, limit_per_host=0, ttl_dns_cache=300),
            auto_decompress=False, skip_auto_headers=("User-Agent",))
        try:
            yield
        finally:
            await state["session"].close()

    async def forward(request: Request) -> Response:
        body = await request.body()
        response = await state["session"].post(
            base + request.scope["path"], data=body,
            headers={"Content-Type": request.headers.get("content-type", "application/json")})
        content_type = response.headers.get("Content-Type", "application/octet-stream")
        if content_type.startswith("text/event-stream"):
            async def relay() -> AsyncIterator[bytes]:
                try:
                    async for chunk in response.content.iter_any():
                        yield chunk
                finally:
                    response.release()

            return StreamingResponse(relay(), status_code=response.status,
                                     media_type=content_type)
        try:
            data = await response.read()
        finally:
            response.release()
        return Response(data, status_code=response.status, media_type=content_type)

    async def healthz(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/healthz", healthz),
                             Route("/v1/{path:path}", forward, methods=["POST"])],
                     lifespan=lifespan)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. "
                    "http://127.0.0.1:9000")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8081)
    args = ap.parse_args()
    uvicorn.run(create_app(args.upstream), host=args.host, port=args.port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
