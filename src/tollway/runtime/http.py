"""Small helpers the HTTP layers share: JSON bodies read exactly, bearer tokens."""

from __future__ import annotations

import ipaddress
import json
from decimal import Decimal
from typing import Any

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.types import Message, Scope

from tollway.billing.keys import Address, Network, within
from tollway.errors import InvalidRequest, PayloadTooLarge


async def limited_body(request: Request) -> bytes:
    """The request body, refused with 413 past ``max_body_bytes`` before more is read."""
    limit: int = request.app.state.ctx.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def form_data(request: Request) -> FormData:
    """A posted form (web console), its body read under the same ``max_body_bytes`` limit as
    the JSON API first: Starlette's own form parser reads however much is sent. Uploaded files
    are spooled as usual; close the form when done with them."""
    body = await limited_body(request)

    async def replay() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, replay).form()


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; numbers with a fraction are read as exact ``Decimal``."""
    raw = await limited_body(request)
    if not raw:
        return {}
    try:
        body = json.loads(raw, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError, RecursionError):  # too deeply nested
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if _has_nul(body):  # names and notes are stored as text, which PostgreSQL refuses NUL in
        raise InvalidRequest("strings in the request body must not contain NUL characters")
    return body


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string")
    return value


def path_int(request: Request, name: str) -> int:
    value = request.path_params[name]
    if not (str(value).isascii() and str(value).isdigit()):
        raise InvalidRequest(f"{name} must be a number, got {value!r}")
    return int(value)


def client_address(scope: Scope, trusted_proxies: tuple[Network, ...]) -> Address | None:
    """The client's address: the peer, or where the peer is a trusted proxy, the
    right-most address of ``X-Forwarded-For`` that is not a trusted proxy."""
    client = scope.get("client")
    peer = _address(client[0]) if client else None
    if peer is None or not within(peer, trusted_proxies):
        return peer
    hops: list[str] = []
    for name, value in scope["headers"]:
        if name == b"x-forwarded-for":
            hops += value.decode("latin-1").split(",")
    for hop in reversed(hops):
        address = _address(hop.strip())
        if address is None:
            return peer  # a forged or broken header: trust only what we saw
        if not within(address, trusted_proxies):
            return address
        peer = address
    return peer


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
