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
from typing import TYPE_CHECKING, Any

from tollway.errors import NoChannelAvailable, UpstreamError, UpstreamTimeout
from tollway.metrics import METRICS
from tollway.upstreams.base import UpstreamRequest, UpstreamResponse
from tollway.upstreams.channels import Channel

if TYPE_CHECKING:
    from tollway.gateway.calls import Call
    from tollway.gateway.state import Gateway

Build = Callable[[Channel], UpstreamRequest]


async def send(gw: Gateway, call: Call, family: str, build: Build) -> UpstreamResponse:
    """The answering attempt's response (its channel is ``call.channel``); raises the last
    UpstreamError when no attempt got an answer, NoChannelAvailable when none could start."""
    board = gw.board
    item = call.item.id
    now = gw.clock()
    channel = board.pick(item, family, now)
    if channel is None:
        wait = board.retry_after_ms(item, family, now)
        raise NoChannelAvailable(
            f"no channel of {item!r} is available (disabled, or its circuit is open)",
            retry_after_s=None if wait is None else max(1, math.ceil(wait / 1000)))
    policy, watchdog = board.policy, gw.watchdog
    started = time.monotonic()
    deadline = started + gw.read_timeout_s
    tried: list[Channel] = []
    while True:
        tried.append(channel)
        call.channel = channel
        if channel.opened:
            board.begin(channel, now)
        timeout = min(gw.headers_timeout_s, deadline - started)
        ticket = watchdog.arm(started + timeout)
        failure: UpstreamError | None = None
        try:
            response = await gw.registry.get(channel.upstream).send(build(channel))
        except UpstreamError as exc:
            watchdog.disarm(ticket)
            failure = exc
        except asyncio.CancelledError:
            if not watchdog.disarm(ticket):
                board.released(channel)
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            failure = UpstreamTimeout(f"the upstream sent no response headers within "
                                      f"{timeout:g} s")
        except BaseException:
            watchdog.disarm(ticket)
            board.released(channel)
            raise
        else:
            if watchdog.disarm(ticket):  # fired as the answer arrived: keep the answer
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        ended = time.monotonic()
        latency = int((ended - started) * 1000)
        if failure is None:
            status = response.status
            if status not in policy.retry_statuses:
                board.succeeded(channel, latency)
                call.attempts.append({"channel": channel.id, "latency_ms": latency,
                                      "status": status})
                METRICS.channel_attempt(channel.id, "ok")
                return response
            retry_ms = _retry_after_ms(response.retry_after) if status == 429 else None
            _failed(gw, call, channel, latency, {"status": status}, str(status), retry_ms)
        else:
            _failed(gw, call, channel, latency, {"error": failure.code}, "error", None)
        now = gw.clock()
        following = None
        if len(tried) < policy.max_attempts and ended < deadline:
            following = board.pick(item, family, now, tried)
        if following is None:
            if failure is not None:
                raise failure
            return response  # the route reports it as it did with one upstream
        if failure is None:
            await response.close()
        channel, started = following, ended


def _failed(gw: Gateway, call: Call, channel: Channel, latency: int, outcome: dict[str, Any],
            label: str, retry_ms: int | None) -> None:
    gw.board.failed(channel, latency, gw.clock(), retry_after_ms=retry_ms)
    call.attempts.append({"channel": channel.id, "latency_ms": latency, **outcome})
    METRICS.channel_attempt(channel.id, label)


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
