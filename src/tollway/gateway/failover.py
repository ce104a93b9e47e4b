"""The attempt loop: send a request through an item's channels until one answers.

Before any byte reaches the client, a connection error, no response headers within
``upstream_headers_timeout_seconds``, or a status in ``channel_retry_statuses`` (408, 429 and
5xx by default) moves on to the next available channel (:meth:`Board.pick`), up to
``channel_max_attempts`` attempts within the request's read timeout. Any other answer (2xx,
the client's own 4xx) is the answer. When no attempt is left, the last failure goes to the
caller as it did with one upstream: the last response (a 429 or 5xx the route reports), or the
last :class:`UpstreamError`. Each attempt is recorded on the call (``channel``, ``attempts``)
and reported to the channel's circuit breaker; nothing here touches money: the route holds
once before and settles once after, from the answering attempt's usage.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

from tollway.errors import NoChannelAvailable, UpstreamError, UpstreamTimeout
from tollway.gateway.state import Gateway
from tollway.metrics import METRICS
from tollway.upstreams.base import UpstreamRequest, UpstreamResponse
from tollway.upstreams.channels import Channel

if TYPE_CHECKING:
    from tollway.gateway.calls import Call

Build = Callable[[Channel], UpstreamRequest]


async def send(gw: Gateway, call: Call, family: str, build: Build) -> UpstreamResponse:
    """The answering attempt's response (its channel is ``call.channel``); raises the last
    UpstreamError when no attempt got an answer, NoChannelAvailable when none could start."""
    board, policy = gw.board, gw.board.policy
    item = call.item.id
    loop = asyncio.get_running_loop()
    deadline = loop.time() + gw.read_timeout_s
    now = gw.clock()
    channel = board.pick(item, family, now)
    if channel is None:
        wait = board.retry_after_ms(item, family, now)
        raise NoChannelAvailable(
            f"no channel of {item!r} is available (disabled, or its circuit is open)",
            retry_after_s=None if wait is None else max(1, math.ceil(wait / 1000)))
    tried: list[Channel] = []
    last: UpstreamError | None = None
    while channel is not None:
        tried.append(channel)
        call.channel = channel
        board.begin(channel, now)
        started = time.monotonic()
        timeout = max(min(gw.headers_timeout_s, deadline - loop.time()), 0.001)
        try:
            # in this task (not wait_for's own): aiohttp ties the response to its task
            async with asyncio.timeout(timeout):
                response = await gw.registry.get(channel.upstream).send(build(channel))
        except (UpstreamError, TimeoutError) as exc:
            last = exc if isinstance(exc, UpstreamError) else UpstreamTimeout(
                f"the upstream sent no response headers within {timeout:g} s")
            _outcome(gw, call, channel, started, None, last)
        except BaseException:
            board.released(channel)
            raise
        else:
            status = response.status
            if status not in policy.retry_statuses:
                _outcome(gw, call, channel, started, status, None)
                return response
            retry_ms = _retry_after_ms(response.retry_after) if status == 429 else None
            _outcome(gw, call, channel, started, status, None, retry_ms=retry_ms)
            following = _following(gw, item, family, tried, deadline, loop.time())
            if following is None:
                return response  # the route reports it as it did with one upstream
            await response.close()
            now, channel = gw.clock(), following
            continue
        now, channel = gw.clock(), _following(gw, item, family, tried, deadline, loop.time())
    assert last is not None
    raise last


def _following(gw: Gateway, item: str, family: str, tried: list[Channel], deadline: float,
               at: float) -> Channel | None:
    if len(tried) >= gw.board.policy.max_attempts or at >= deadline:
        return None
    return gw.board.pick(item, family, gw.clock(), tried)


def _outcome(gw: Gateway, call: Call, channel: Channel, started: float, status: int | None,
             error: UpstreamError | None, *, retry_ms: int | None = None) -> None:
    latency = int((time.monotonic() - started) * 1000)
    failed = error is not None or status in gw.board.policy.retry_statuses
    if failed:
        gw.board.failed(channel, latency, gw.clock(), retry_after_ms=retry_ms)
    else:
        gw.board.succeeded(channel, latency)
    attempt: dict[str, object] = {"channel": channel.id, "latency_ms": latency}
    if status is not None:
        attempt["status"] = status
    if error is not None:
        attempt["error"] = error.code
    call.attempts.append(attempt)
    METRICS.channel_attempt(channel.id, "error" if error is not None
                            else str(status) if failed else "ok")


def _retry_after_ms(value: str | None) -> int | None:
    """``Retry-After``: seconds, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(int((moment.timestamp() - time.time()) * 1000), 0) or None
