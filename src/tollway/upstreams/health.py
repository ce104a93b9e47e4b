"""Health checks that cost nothing: a free request to each channel's upstream (``GET
/models`` for LLM providers, the provider's ``health_path`` for data APIs), never a paid
completion. Used by ``tollway channels test`` and by the gateway's periodic check."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tollway.errors import UpstreamError
from tollway.upstreams.base import UpstreamRequest
from tollway.upstreams.channels import Channel
from tollway.upstreams.registry import Registry


@dataclass(frozen=True, slots=True)
class Health:
    channel: str
    ok: bool | None  # None: not checked (a data API without health_path)
    status: int | None
    latency_ms: int
    detail: str


def health_path(kind: str, config: Mapping[str, Any]) -> str | None:
    path = config.get("health_path")
    if path:
        return str(path)
    return "/models" if kind in ("openai", "anthropic", "sandbox") else None


async def check(registry: Registry, channel: Channel, kind: str, config: Mapping[str, Any],
                *, timeout_s: float = 10) -> Health:
    path = health_path(kind, config)
    if path is None:
        return Health(channel.id, None, None, 0, "no health_path configured: not checked")
    if kind == "sandbox":
        return Health(channel.id, True, 200, 0, "built-in sandbox")
    started = time.monotonic()
    try:
        response = await asyncio.wait_for(
            registry.get(channel.upstream).send(UpstreamRequest("GET", path)), timeout_s)
        await response.close()
    except (UpstreamError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, UpstreamError) else "no answer in time"
        return Health(channel.id, False, None, _ms(started), message)
    status = response.status
    ok = 200 <= status < 300
    return Health(channel.id, ok, status, _ms(started), f"GET {path}: {status}")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
