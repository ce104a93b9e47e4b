"""What the LLM and per-call routes share: the metered call, its usage record, its replies."""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from starlette.types import Scope, Send

from tollway import clock, tracing
from tollway.billing import keys, metering
from tollway.billing.limits import NO_LIMITS, Limits, Window
from tollway.billing.metering import ClientKey, Replay, Reservation
from tollway.errors import InvalidRequest, LimitExceeded, TollwayError, UpstreamError
from tollway.gateway import failover, jsonio
from tollway.gateway.asgi import error_body, header, send_bytes, send_error
from tollway.gateway.state import Gateway
from tollway.ledger.ledger import Hold
from tollway.metrics import METRICS
from tollway.money import format_usd, to_nano_usd
from tollway.pricing.rating import AppliedRatio, Charge, TokenPrice, TokenUsage, resolve_ratio
from tollway.pricing.upstream_cost import upstream_cost_nano
from tollway.runtime.observe import ACCOUNT, COST, ERROR_CODE, PRODUCT, REQUEST_ID
from tollway.store.accounts import ApiKeyRecord
from tollway.store.catalog import Item, price_columns
from tollway.upstreams.base import UpstreamRequest
from tollway.upstreams.channels import Channel

COST_HEADER = b"x-tollway-cost-usd"
#: On an upstream's own non-2xx answer, passed through unchanged: tells a client that the body
#: is the upstream's, not Tollway's error shape.
UPSTREAM_ERROR_HEADER = (b"x-tollway-upstream-error", b"true")
T = TypeVar("T")


@dataclass
class Call:
    """One metered request from authentication to its usage record."""

    scope: Scope
    key: ApiKeyRecord
    item: Item
    ratio: AppliedRatio
    route: str
    stream: bool = False
    started: float = field(default_factory=time.monotonic)
    client_key: ClientKey | None = None
    hold: Hold | None = None
    ttft_ms: int | None = None
    clock: Callable[[], int] | None = None  # the gateway's; None: the ledger's clock
    limits: Limits = NO_LIMITS
    window: Window | None = None  # the key's rate-limit window once admitted
    counted_tokens: int = 0  # what this request counted against TPM at admission
    trace: tracing.CallTrace | None = None  # its spans, when tracing is on
    #: how this route's own error answers read (Anthropic's shape on /v1/messages)
    render_error: Callable[[Scope, TollwayError], bytes] = error_body
    #: the channel of the last attempt (the one that answered) and every attempt made
    channel: Channel | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    #: what the upstream said it charged (OpenRouter's ``usage.cost``), and the tolerance
    #: beyond which it is flagged against the cost computed from the channel's ``cost``
    reported_cost: Decimal | None = None
    cost_tolerance: Decimal = Decimal("0.05")
    size: str | None = None  # an image request's size (its upstream cost per size)

    def tool_calls_json(self, calls: tuple[tuple[str, int], ...]) -> str | None:
        """The record's server-side tool calls with the price each was billed at (None: the
        model's price names no fee for it, so it was not billed)."""
        if not calls:
            return None
        price = self.item.version.price
        return jsonio.dumps({tool: {"calls": count, "nano_per_call": (  # calls sorted by tool
            None if not isinstance(price, TokenPrice) or (unit := price.tool_price(tool)) is None
            else to_nano_usd(unit))} for tool, count in calls}).decode()

    def rate_headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.window is None else self.window.headers()

    @property
    def request_id(self) -> str:
        return str(self.scope[REQUEST_ID])

    @property
    def group(self) -> str:
        return keys.effective_group(self.key)

    def elapsed_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    def charged(self, cost_nano: int) -> None:
        """The settlement is durable: count it, and tell the access log what it cost."""
        self.scope[COST] = cost_nano
        METRICS.charge(self.item.id, cost_nano)

    def mark_first_byte(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = self.elapsed_ms()

    def record(self, *, type_: str, status: int, usage_source: str = "none",
               input_tokens: int = 0, cached: int = 0, cache_write: int = 0,
               cache_write_1h: int = 0, output: int = 0, reasoning: int = 0, calls: int = 0,
               unit_price: Decimal | None = None, error: TollwayError | None = None,
               note: str | None = None, tool_calls: tuple[tuple[str, int], ...] = ()
               ) -> dict[str, Any]:
        """The usage record's fields (the metering layer adds hold and cost)."""
        prices = price_columns(self.item.version.price, unit_price=unit_price)
        return {
            "request_id": self.request_id,
            "created_at_ms": self.clock() if self.clock is not None else clock.now_ms(),
            "account_id": self.key.account_id, "key_id": self.key.id,
            "key_name": self.key.name, "group_name": self.group,
            "ratio": str(self.ratio.value), "ratio_source": self.ratio.source,
            "type": type_, "billing_type": self.item.billing_type, "product": self.item.id,
            "route": self.route, "status": status, "stream": self.stream,
            "duration_ms": self.elapsed_ms(), "ttft_ms": self.ttft_ms,
            "input_tokens": input_tokens, "cached_input_tokens": cached,
            "cache_write_tokens": cache_write, "cache_write_1h_tokens": cache_write_1h,
            "output_tokens": output,
            "reasoning_tokens": reasoning, "calls": calls,
            **prices,
            "price_version_id": self.item.version.id,
            "usage_source": usage_source,
            "error_code": error.code if error else None,
            "note": _text(error.message if error else note),
            "tool_calls": self.tool_calls_json(tool_calls),
            **upstream_cost_columns(self, type_, input_tokens, cached, cache_write,
                                    cache_write_1h, output, calls),
        }


def upstream_cost_columns(call: Call, type_: str, input_tokens: int, cached: int,
                          cache_write: int, cache_write_1h: int, output: int,
                          calls: int) -> dict[str, Any]:
    """The record's channel columns: which channel answered, the attempts, and the upstream
    cost (the channel's ``cost`` applied to the billed usage, exactly, rounded once)."""
    channel = call.channel
    computed = reported = mismatch = None
    if type_ == "consume":
        cost = channel.cost if channel is not None else None
        if cost is not None:
            computed = upstream_cost_nano(cost, TokenUsage(input_tokens, output, cached,
                                                           cache_write, cache_write_1h),
                                          calls, call.size)
        if call.reported_cost is not None:
            reported = to_nano_usd(call.reported_cost)
            if computed is not None:
                mismatch = (abs(Decimal(reported - computed))
                            > call.cost_tolerance * Decimal(computed))
    return {"channel": channel.id if channel is not None else None,
            "attempts": jsonio.dumps(call.attempts).decode() if call.attempts else None,
            "upstream_cost_nano": computed, "upstream_reported_cost_nano": reported,
            "upstream_cost_mismatch": mismatch}


def _text(note: str | None) -> str | None:
    """A note as PostgreSQL can store it: an upstream's words may hold NUL characters."""
    return note.replace("\x00", "\ufffd") if note else note


def begin(gw: Gateway, scope: Scope, key: ApiKeyRecord, item: Item, route: str,
          body: bytes) -> Call:
    """Checks that need no database: model allowlist, quota pre-check, the ratio,
    Idempotency-Key."""
    keys.check_item(key, item.id)
    keys.check_quota(key)
    group = keys.effective_group(key)
    if group not in gw.catalog.ratios:
        raise InvalidRequest(f"the key's group {group!r} is not in the catalog")
    ratio = resolve_ratio(group, gw.catalog.ratios, item.version.group_ratios)
    call = Call(scope, key, item, ratio, route, clock=gw.clock, limits=gw.catalog.limits(key),
                cost_tolerance=gw.cost_tolerance)
    scope[PRODUCT] = item.id
    scope[ACCOUNT] = key.account_id
    if tracing.enabled():
        call.trace = tracing.start(
            scope, route=route, endpoint_path=item.spec.path, item_id=item.id,
            billing_type=item.billing_type, system=gw.registry.kind(item.provider),
            account_id=key.account_id, key_id=key.id, group=group, ratio=str(ratio.value),
            request_id=call.request_id)
    idem = header(scope, b"idempotency-key")
    if idem:
        if len(idem) > 200:
            raise InvalidRequest("Idempotency-Key must be at most 200 characters")
        # method, path, query string and body: the same key with another ``?q=`` is another
        # request (409 idempotency_key_reused), never a replay of the first answer
        digest = hashlib.sha256(scope["method"].encode() + b" " + scope["path"].encode()
                                + b"?" + scope.get("query_string", b"") + b"\n" + body)
        call.client_key = ClientKey(key.id, idem, digest.hexdigest())
    return call


async def reserve(gw: Gateway, call: Call, amount_nano: int, *, tokens: int = 0,
                  shrink: Callable[[int], tuple[int, Any] | None] | None = None
                  ) -> Reservation | Replay:
    """Admit the request under the key's limits and place its hold, in one writer operation.
    A request a limit refuses is recorded (an error record, cost 0) and the error re-raised;
    nothing was held or forwarded."""
    key, at = call.key, gw.clock()
    try:
        result = await gw.ctx.write(lambda conn: metering.reserve(
            conn, request_id=call.request_id, account_id=key.account_id, key_id=key.id,
            amount_nano=amount_nano, ttl_ms=gw.ctx.hold_ttl_ms, client_key=call.client_key,
            shrink=shrink, limits=call.limits, tokens=tokens, at_ms=at),
            account_id=key.account_id)
    except LimitExceeded as exc:
        record = call.record(type_="error", status=exc.status, error=exc)
        await gw.ctx.write(lambda conn: metering.refuse(conn, record=record),
                           account_id=key.account_id)
        raise
    if isinstance(result, Reservation):
        call.hold, call.window, call.counted_tokens = result.hold, result.window, tokens
    return result


REPLAYED_HEADER = (b"x-tollway-replayed", b"true")
#: the opening of a stream's cost object, however the chunk was serialised
_COST_OBJECT = re.compile(rb'"tollway":\s*\{')


async def send_replay(send: Send, replay: Replay) -> None:
    """The first answer again, saying it is a replay (``X-Tollway-Replayed: true``; in a
    stream, ``"replayed": true`` in the cost object and ``replayed=true`` in the cost comment):
    the cost shown is what the first request was charged, not charged again."""
    body = replay.body
    if replay.content_type.startswith("text/event-stream"):
        body = _COST_OBJECT.sub(rb'\g<0>"replayed":true,', body)
        body = _COST_COMMENT.sub(rb"\g<0> replayed=true", body)
    await send_bytes(send, replay.status, body, replay.content_type.encode(),
                     headers=[(COST_HEADER, format_usd(replay.cost_nano).encode()),
                              REPLAYED_HEADER,
                              (b"x-tollway-replayed-request-id", replay.request_id.encode())])


_COST_COMMENT = re.compile(rb"^: tollway cost_usd=[0-9.]+", re.MULTILINE)


async def fail(gw: Gateway, call: Call, send: Send, exc: TollwayError, *, status: int | None = None,
               body: bytes | None = None, content_type: bytes = b"application/json",
               send_response: bool = True) -> None:
    """The request failed before anything billable happened: void the hold, record the error
    (cost 0), and answer the client."""
    call.scope[ERROR_CODE] = exc.code
    if call.trace is not None:
        call.trace.failed(exc.code)
    if isinstance(exc, UpstreamError):
        METRICS.upstream_error(call.item.id, exc.code, status or exc.status)
    if call.hold is not None:
        record = call.record(type_="error", status=status or exc.status, error=exc)
        hold_id, at = call.hold.id, gw.clock()
        await gw.ctx.write(lambda conn: metering.void(
            conn, hold_id=hold_id, record=record, at_ms=at, client_key=call.client_key,
            window=call.window, counted_tokens=call.counted_tokens),
            account_id=call.key.account_id)
    if send_response:
        if body is None:
            await send_bytes(send, exc.status, call.render_error(call.scope, exc),
                             headers=[*exc.response_headers(), *call.rate_headers()])
        else:
            await send_bytes(send, status or exc.status, body, content_type,
                             headers=[UPSTREAM_ERROR_HEADER, *call.rate_headers()])


async def settle(gw: Gateway, call: Call, *, charge: Charge, record: dict[str, Any],
                 response: tuple[int, str, bytes | None] | None,
                 remember: tuple[str, ...] = ()) -> None:
    """Book ``charge`` (``metering.rate``) with its usage record at the gateway's time; the
    key's rate-limit window gets the record's actual tokens in place of what admission
    counted."""
    assert call.hold is not None
    hold_id, client_key, at = call.hold.id, call.client_key, gw.clock()
    window, counted = call.window, call.counted_tokens
    with tracing.settling(call.trace, cost_nano=charge.cost_nano_usd, record=record):
        await gw.ctx.write(lambda conn: metering.settle(
            conn, hold_id=hold_id, charge=charge, record=record, client_key=client_key,
            response=response, at_ms=at, window=window, counted_tokens=counted,
            remember=remember),
            account_id=call.key.account_id)
    call.charged(charge.cost_nano_usd)


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's whole answer to a non-streamed request."""

    status: int
    content_type: str
    body: bytes

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def fetch(gw: Gateway, call: Call, send: Send, family: str,
                build: Callable[[Channel], UpstreamRequest]) -> Answer | None:
    """Send the request through the item's channels (``failover``) and read the whole answer;
    if no upstream can be reached or the answer breaks off, void the hold, answer the client,
    and return None."""
    if call.trace is not None:
        call.trace.upstream_started(call.item.provider)
    try:
        response = await failover.send(gw, call, family, build)
        try:
            body = await response.read()
        finally:
            await response.close()
    except UpstreamError as exc:
        await fail(gw, call, send, exc)
        return None
    call.mark_first_byte()
    return Answer(response.status, response.content_type, body)


async def settle_answer(gw: Gateway, call: Call, send: Send, answer: Answer, *,
                        charge: Charge, record: dict[str, Any]) -> None:
    """Book ``charge`` with its usage record (the answer kept for an Idempotency-Key replay)
    and pass the upstream's answer on with the cost and rate-limit headers."""
    await settle(gw, call, charge=charge, record=record,
                 response=(answer.status, answer.content_type, answer.body))
    await send_bytes(send, answer.status, answer.body, answer.content_type.encode(),
                     headers=[(COST_HEADER, format_usd(charge.cost_nano_usd).encode()),
                              *call.rate_headers()])


async def admit(scope: Scope, send: Send, prepared: Awaitable[T | Replay], *,
                render: Callable[[Scope, TollwayError], bytes] = error_body) -> T | None:
    """The start every metered route shares: await its preparation (authenticate, check,
    reserve); a refusal is answered in the route's error shape and a replayed
    Idempotency-Key with the first response, and then there is nothing to forward (None)."""
    try:
        result = await prepared
    except TollwayError as exc:
        await send_error(scope, send, exc, render=render)
        return None
    if isinstance(result, Replay):
        await send_replay(send, result)
        return None
    return result


async def refuse_answer(gw: Gateway, call: Call, send: Send, status: int, body: bytes,
                        content_type: str, *, passed_from: int = 400) -> None:
    """An upstream's non-2xx answer to a model request: a 4xx (from ``passed_from``) is the
    client's request, so the client sees the upstream's answer; anything else is a 502.
    Nothing is charged."""
    refused = UpstreamError(f"the upstream answered {status}: "
                            f"{body[:300].decode('utf-8', 'replace')}")
    if passed_from <= status < 500:
        await fail(gw, call, send, refused, status=status, body=body,
                   content_type=content_type.encode())
    else:
        await fail(gw, call, send, refused, status=502)
