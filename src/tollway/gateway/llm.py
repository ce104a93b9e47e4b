"""OpenAI-compatible LLM routes: chat completions (streaming included), completions,
embeddings, and the model list.

Per request: authenticate (cached) → checks → hold for the estimated prompt plus the output
bound (lowering ``max_tokens`` to what the balance affords, reported in
``X-Tollway-Max-Tokens``) → forward → settle from the upstream's usage, or from a local count
marked ``estimated`` when a stream ends without one → one usage record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from tollway import tokens
from tollway.billing import metering
from tollway.billing.metering import Replay
from tollway.errors import (
    InvalidRequest,
    StorageUnavailable,
    TollwayError,
    UpstreamError,
)
from tollway.gateway.asgi import json_object, read_body, send_bytes, send_error
from tollway.gateway.calls import COST_HEADER, Call, begin, fail, send_replay
from tollway.gateway.sse import EventSplitter, event_data
from tollway.gateway.state import Gateway
from tollway.gateway.usage import MeteredUsage, bounded, parse_openai_usage
from tollway.money import format_usd
from tollway.pricing.rating import InvalidUsage, TokenPrice, TokenUsage, rate_tokens
from tollway.upstreams.base import UpstreamRequest, UpstreamResponse
from tollway.web.observe import ERROR_CODE

log = logging.getLogger("tollway")
MAX_TOKENS_HEADER = b"x-tollway-max-tokens"
#: How far a reported prompt may exceed the local estimate before it is capped for review.
PROMPT_SLACK_FACTOR = 4
PROMPT_SLACK_TOKENS = 4096
ERROR_BODY_LIMIT = 64 * 1024
REPLAY_BODY_LIMIT = 1024 * 1024

ROUTES = {"chat": "/chat/completions", "completions": "/completions",
          "embeddings": "/embeddings"}


@dataclass
class LLMCall:
    gw: Gateway
    call: Call
    payload: dict[str, Any]
    price: TokenPrice
    prompt_estimate: int
    output_bound: int | None  # None for embeddings (no output)
    max_field: str | None
    #: Completions generated per request (``n``; for /v1/completions also ``best_of``): the
    #: output bound is per choice, the upstream bills all of them.
    choices: int = 1
    client_wants_usage: bool = True
    lowered_to: int | None = None
    delivered: list[str] = field(default_factory=list)

    def hold_cost(self, prompt: int, output: int) -> int:
        worst = TokenPrice(max(self.price.input_per_1m, self.price.effective_cache_read_per_1m,
                               self.price.effective_cache_write_per_1m),
                           self.price.output_per_1m)
        return max(rate_tokens(TokenUsage(prompt, output), worst, self.call.ratio).cost_nano_usd,
                   1)

    def affordable(self, available: int) -> tuple[int, int] | None:
        """The largest output bound whose hold the balance covers, with that hold."""
        if self.output_bound is None or self.output_bound <= 1:
            return None
        low, high = 0, self.output_bound - 1
        while low < high:
            mid = (low + high + 1) // 2
            if self.hold_cost(self.prompt_estimate, mid * self.choices) <= available:
                low = mid
            else:
                high = mid - 1
        if low < 1:
            return None
        return self.hold_cost(self.prompt_estimate, low * self.choices), low

    def extra_headers(self) -> list[tuple[bytes, bytes]]:
        if self.lowered_to is None:
            return []
        return [(MAX_TOKENS_HEADER, str(self.lowered_to).encode())]


class LLMRoute:
    """A plain ASGI endpoint for one of :data:`ROUTES`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.path = ROUTES[kind]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gateway
        try:
            prepared = await self._prepare(gw, scope, receive)
        except TollwayError as exc:
            await send_error(scope, send, exc)
            return
        if isinstance(prepared, Replay):
            await send_replay(send, prepared)
            return
        await self._forward(gw, prepared, receive, send)

    # ------------------------------------------------------------------ before forwarding

    async def _prepare(self, gw: Gateway, scope: Scope, receive: Receive) -> LLMCall | Replay:
        body = await read_body(receive, gw.max_body_bytes)
        key = await gw.authenticate(scope)
        payload = json_object(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required")
        item = gw.catalog.model(model)
        call = begin(gw, scope, key, item, "/v1" + self.path, body)
        price = item.version.price
        assert isinstance(price, TokenPrice)
        max_field, bound = self._output_bound(payload, int(item.spec.get("max_output_tokens")
                                                           or 4096))
        llm = LLMCall(gw, call, payload, price, tokens.estimate_prompt(payload), bound, max_field,
                      choices=self._choices(payload))
        call.stream = self.kind != "embeddings" and payload.get("stream") is True
        amount = llm.hold_cost(llm.prompt_estimate, (bound or 0) * llm.choices)
        result = await gw.ctx.write(lambda conn: metering.reserve(
            conn, request_id=call.request_id, account_id=key.account_id, key_id=key.id,
            amount_nano=amount, ttl_ms=gw.ctx.hold_ttl_ms, client_key=call.client_key,
            shrink=llm.affordable if max_field else None), account_id=key.account_id)
        if isinstance(result, Replay):
            return result
        call.hold = result.hold
        if result.granted is not None:
            llm.lowered_to = int(result.granted)
            payload[max_field or "max_tokens"] = llm.lowered_to
        return llm

    def _choices(self, payload: dict[str, Any]) -> int:
        if self.kind == "embeddings":
            return 1
        count = 1
        for name in ("n", "best_of") if self.kind == "completions" else ("n",):
            value = payload.get(name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 128:
                raise InvalidRequest(f"{name} must be an integer from 1 to 128")
            count = max(count, value)
        return count

    def _output_bound(self, payload: dict[str, Any], model_max: int) -> tuple[str | None,
                                                                              int | None]:
        if self.kind == "embeddings":
            return None, None
        fields = ("max_completion_tokens", "max_tokens") if self.kind == "chat" else (
            "max_tokens",)
        for name in fields:
            value = payload.get(name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidRequest(f"{name} must be a positive integer")
            return name, value
        return fields[-1], model_max

    # ------------------------------------------------------------------ forwarding

    async def _forward(self, gw: Gateway, llm: LLMCall, receive: Receive, send: Send) -> None:
        call = llm.call
        original = dict(llm.payload)
        payload = llm.payload
        payload["model"] = call.item.spec.get("upstream_model") or call.item.id
        if call.stream:
            options = payload.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            llm.client_wants_usage = options.get("include_usage") is True
            options["include_usage"] = True
            payload["stream_options"] = options
        request = UpstreamRequest(
            "POST", self.path, json.dumps(payload).encode(),
            headers={"Content-Type": "application/json",
                     "Accept": "text/event-stream" if call.stream else "application/json"},
            stream=call.stream)
        try:
            response = await gw.registry.get(call.item.provider).send(request)
        except UpstreamError as exc:
            await fail(gw, call, send, exc)
            return
        try:
            if not 200 <= response.status < 300:
                await self._upstream_refused(llm, response, send)
            elif call.stream:
                await self._stream(llm, original, response, receive, send)
            else:
                await self._complete(llm, original, response, send)
        finally:
            await response.close()

    async def _upstream_refused(self, llm: LLMCall, response: UpstreamResponse,
                                send: Send) -> None:
        try:
            body = (await response.read())[:ERROR_BODY_LIMIT]
        except UpstreamError:
            body = b""
        status = response.status
        exc = UpstreamError(f"the upstream answered {status}: "
                            f"{body[:300].decode('utf-8', 'replace')}")
        if 400 <= status < 500:  # the client's request: show them the upstream's answer
            await fail(llm.gw, llm.call, send, exc, status=status, body=body,
                       content_type=response.content_type.encode())
        else:
            await fail(llm.gw, llm.call, send, exc, status=502)

    async def _complete(self, llm: LLMCall, original: dict[str, Any],
                        response: UpstreamResponse, send: Send) -> None:
        call = llm.call
        try:
            raw = await response.read()
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError
        except UpstreamError as exc:
            await fail(llm.gw, call, send, exc)
            return
        except ValueError:
            await fail(llm.gw, call, send,
                       UpstreamError("the upstream answered 2xx with a body that is not a JSON "
                                     "object"))
            return
        call.mark_first_byte()
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict):
                _collect(choice.get("message") or {}, llm.delivered)
                if isinstance(choice.get("text"), str):
                    llm.delivered.append(choice["text"])
        metered = self._meter(llm, original, obj.get("usage"))
        cost = await self._settle(llm, metered, status=200,
                                  response=(200, response.content_type, raw))
        await send_bytes(send, 200, raw, response.content_type.encode(),
                         headers=[(COST_HEADER, format_usd(cost).encode()),
                                  *llm.extra_headers()])

    def _meter(self, llm: LLMCall, original: dict[str, Any], raw_usage: Any) -> MeteredUsage:
        """The usage to bill: the upstream's, checked and bounded; else a local count."""
        bound = llm.lowered_to or llm.output_bound
        if bound is not None:
            bound *= llm.choices
        try:
            usage, reasoning = parse_openai_usage(raw_usage)
            if self.kind == "embeddings":
                usage = TokenUsage(usage.prompt_tokens, 0, usage.cached_tokens,
                                   usage.cache_write_tokens)
            return bounded(usage, reasoning,
                           prompt_bound=max(llm.prompt_estimate * PROMPT_SLACK_FACTOR,
                                            llm.prompt_estimate + PROMPT_SLACK_TOKENS),
                           completion_bound=bound)
        except InvalidUsage as exc:
            prompt = tokens.count_prompt(original)
            # The delivered text as a whole: counting each chunk on its own would bill the
            # upstream's chunking ("Hello " + "there " is 4 tokens apart, 2 together).
            output = tokens.count("".join(llm.delivered))
            if bound is not None:
                output = min(output, bound)
            return MeteredUsage(TokenUsage(prompt, output), 0, "estimated",
                                f"usage estimated locally: {exc}")

    async def _settle(self, llm: LLMCall, metered: MeteredUsage, *, status: int,
                      response: tuple[int, str, bytes | None] | None,
                      note: str | None = None) -> int:
        call = llm.call
        usage = metered.usage
        cost = rate_tokens(usage, llm.price, call.ratio).cost_nano_usd
        record = call.record(type_="consume", status=status, usage_source=metered.source,
                             input_tokens=usage.prompt_tokens, cached=usage.cached_tokens,
                             cache_write=usage.cache_write_tokens,
                             output=usage.completion_tokens, reasoning=metered.reasoning_tokens,
                             note="; ".join(n for n in (metered.note, note) if n) or None)
        assert call.hold is not None
        hold_id, client_key = call.hold.id, call.client_key
        await llm.gw.ctx.write(lambda conn: metering.settle(
            conn, hold_id=hold_id, cost_nano=cost, record=record, client_key=client_key,
            response=response), account_id=call.key.account_id)
        call.charged(cost)
        return cost

    # ------------------------------------------------------------------ streaming

    async def _stream(self, llm: LLMCall, original: dict[str, Any], response: UpstreamResponse,
                      receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache"), *llm.extra_headers()]})
        # keep a copy of what is sent only when an Idempotency-Key replay may need it
        state = _StreamState(sent=[] if llm.call.client_key is not None else None)
        pump = asyncio.ensure_future(self._pump(llm, response, send, state))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not pump.done():  # the client went away: stop reading, bill what was delivered
            state.client_gone = True
            pump.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await asyncio.shield(self._finish_stream(llm, original, state, send))

    async def _pump(self, llm: LLMCall, response: UpstreamResponse, send: Send,
                    state: _StreamState) -> None:
        splitter = EventSplitter()
        try:
            async for chunk in response.chunks():
                for event in splitter.feed(chunk):
                    if not await self._relay(llm, event, send, state):
                        return
            state.cut = splitter.rest() != b"" or not state.done
        except UpstreamError as exc:
            state.failure = exc
            state.cut = True

    async def _relay(self, llm: LLMCall, event: bytes, send: Send, state: _StreamState) -> bool:
        """Forward one event (or keep it back); False once the stream is over."""
        data = event_data(event)
        if data is None:
            await _send_chunk(send, event, state)
            return True
        if data.strip() == b"[DONE]":
            state.done = True
            return False
        try:
            obj = json.loads(data)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("usage") and not obj.get("choices"):
            state.usage = obj  # settled first, then sent with the cost
            return True
        if isinstance(obj, dict):
            if obj.get("usage"):
                state.usage = {"usage": obj["usage"]}
            for choice in obj.get("choices") or []:
                if isinstance(choice, dict):
                    _collect(choice.get("delta") or {}, llm.delivered)
                    if isinstance(choice.get("text"), str):
                        llm.delivered.append(choice["text"])
        llm.call.mark_first_byte()
        await _send_chunk(send, event, state)
        return True

    async def _finish_stream(self, llm: LLMCall, original: dict[str, Any], state: _StreamState,
                             send: Send) -> None:
        call = llm.call
        if not any(llm.delivered) and state.usage is None:
            exc = state.failure or UpstreamError("the upstream stream ended before any output")
            await fail(llm.gw, call, send, exc, status=502, send_response=False)
            await _end_with_error(send, call, exc, state)
            return
        metered = self._meter(llm, original, (state.usage or {}).get("usage"))
        note = None
        if state.client_gone:
            note = "the client disconnected mid-stream"
        elif state.cut:
            note = state.failure.message if state.failure else "the upstream stream broke off"
        cost = rate_tokens(metered.usage, llm.price, call.ratio).cost_nano_usd
        tail = b""
        if state.usage is not None and llm.client_wants_usage:
            usage_event = dict(state.usage)
            usage_event["tollway"] = {"cost_usd": format_usd(cost),
                                      "request_id": call.request_id,
                                      "usage_source": metered.source}
            tail += b"data: " + json.dumps(usage_event).encode() + b"\n\n"
        tail += b": tollway cost_usd=" + format_usd(cost).encode() + b"\n\n"
        done = b"data: [DONE]\n\n" if state.done else b""
        # A retry with the same Idempotency-Key gets this stream back (without it the key
        # stayed "in progress" for 24 hours).
        replay = None
        if call.client_key is not None and state.sent is not None:
            replay = (200, "text/event-stream", b"".join(state.sent) + tail + done)
        try:
            await self._settle(llm, metered, status=200, response=replay, note=note)
        except StorageUnavailable as exc:
            # The upstream answered but the charge cannot be recorded. The client is told so,
            # never a cost that is not in the books; the hold stays open until the reaper
            # releases it, so nothing is charged for this stream.
            log.warning("request %s: settling the stream failed, the database is unavailable; "
                        "its hold is left to expire", call.request_id)
            await _end_with_error(send, call, exc, state)
            return
        except BaseException:
            if not state.client_gone:
                await send({"type": "http.response.body", "body": done})
            raise
        if not state.client_gone:
            await send({"type": "http.response.body", "body": tail + done})


@dataclass
class _StreamState:
    usage: dict[str, Any] | None = None
    done: bool = False
    cut: bool = False
    client_gone: bool = False
    failure: UpstreamError | None = None
    #: What the client was sent, for an Idempotency-Key replay; None past REPLAY_BODY_LIMIT.
    sent: list[bytes] | None = field(default_factory=list)
    sent_bytes: int = 0


async def _end_with_error(send: Send, call: Call, exc: TollwayError, state: _StreamState) -> None:
    """End a stream whose headers are sent with an error event in the one error shape."""
    call.scope[ERROR_CODE] = exc.code
    if state.client_gone:
        return
    await _send_chunk(send, b"data: " + json.dumps({"error": {
        "type": exc.type, "code": exc.code, "message": exc.message,
        "request_id": call.request_id}}).encode() + b"\n\n", state)
    await send({"type": "http.response.body", "body": b""})


async def _send_chunk(send: Send, body: bytes, state: _StreamState) -> None:
    if state.sent is not None:
        state.sent.append(body)
        state.sent_bytes += len(body)
        if state.sent_bytes > REPLAY_BODY_LIMIT:
            state.sent = None
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _collect(message: dict[str, Any], out: list[str]) -> None:
    """The generated text of a message or delta, for a local count."""
    for key in ("content", "reasoning_content", "refusal"):
        value = message.get(key)
        if isinstance(value, str):
            out.append(value)
    for tool_call in message.get("tool_calls") or []:
        if isinstance(tool_call, dict):
            function = tool_call.get("function") or {}
            if isinstance(function, dict):
                out.extend(str(function.get(k) or "") for k in ("name", "arguments"))
