"""The token-billed request lifecycle every LLM protocol shares (chat completions, Anthropic
messages, Responses): authenticate → checks → hold for the estimated prompt plus the output
bound (lowering it to what the balance affords, reported in ``X-Tollway-Max-Tokens``) →
forward → settle from the upstream's usage, or from a local count marked ``estimated`` when a
stream ends without it → one usage record. The hold is admitted under the key's limits
(``calls.reserve``: RPM, TPM counting the estimated prompt, concurrency, spend caps);
settlement replaces that estimate in the key's TPM window by the input + output tokens billed,
and every response after admission carries the ``X-RateLimit-*`` headers.

A protocol is a :class:`TokenRoute` subclass that says how its requests name the output bound,
how its answers report usage (converted explicitly to the rating inputs) and how its stream
events read; the money path is here once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from tollway import tokens
from tollway.billing import metering
from tollway.billing.metering import Replay
from tollway.errors import InvalidRequest, StorageUnavailable, TollwayError, UpstreamError
from tollway.gateway import failover, jsonio
from tollway.gateway.asgi import error_body, json_object, read_body, send_bytes, stream_flag
from tollway.gateway.calls import (
    COST_HEADER,
    Call,
    admit,
    begin,
    fail,
    refuse_answer,
    reserve,
    settle,
)
from tollway.gateway.sse import EventSplitter
from tollway.gateway.state import Gateway
from tollway.gateway.usage import MeteredUsage, bounded
from tollway.money import MAX_NANO_USD, format_usd
from tollway.pricing.nano import TokenRater
from tollway.pricing.rating import Charge, InvalidUsage, TokenPrice, TokenUsage
from tollway.pricing.upstream_cost import reported_cost
from tollway.runtime.observe import ERROR_CODE
from tollway.upstreams.base import UpstreamRequest, UpstreamResponse
from tollway.upstreams.channels import Channel

log = logging.getLogger("tollway")

MAX_TOKENS_HEADER = b"x-tollway-max-tokens"
ERROR_BODY_LIMIT = 64 * 1024
REPLAY_BODY_LIMIT = 1024 * 1024


@dataclass
class LLMCall:
    gw: Gateway
    call: Call
    payload: dict[str, Any]
    price: TokenPrice
    prompt_estimate: int
    output_bound: int | None  # None for embeddings (no output)
    max_field: str | None
    provider: str
    #: Completions generated per request (``n``; for /v1/completions also ``best_of``): the
    #: output bound is per choice, the upstream bills all of them.
    choices: int = 1
    client_wants_usage: bool = True
    lowered_to: int | None = None
    delivered: list[str] = field(default_factory=list)
    #: stream events relayed without parsing (they carry no usage), as received: read for
    #: their text only if the stream ends without usage (``TokenRoute.drain``)
    unparsed: list[bytes] = field(default_factory=list)
    unparsed_bytes: int = 0
    #: ids the answer created that a later request may continue (a Response's, its
    #: conversation's): remembered with the settlement
    created_ids: tuple[str, ...] = ()

    def hold_cost(self, prompt: int, output: int) -> int:
        """The hold for ``prompt`` tokens at the dearest input-side price (however the
        upstream bills them) plus ``output`` tokens, in integer nano-USD: the same amount as
        ``metering.rate`` at that price (``pricing/nano.py``, proven equal by
        ``tests/test_rating_nano.py``), without a ``Decimal`` context per try when the hold
        is lowered to what the balance affords. A hold is not a charge: the settlement's
        charge is ``metering.rate``'s."""
        cost = TokenRater.of(self.price, self.call.ratio.value).worst_case_nano(prompt, output)
        # an absurd max_tokens (10^30) asks for more than any balance holds: the ledger's
        # columns stop at MAX_NANO_USD, and the hold is then lowered to what the balance affords
        return min(max(cost, 1), MAX_NANO_USD)

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


@dataclass
class StreamState:
    #: The raw usage object read so far (a protocol may merge several events into it).
    usage: dict[str, Any] | None = None
    #: The event that carried the usage, when the protocol re-sends it with the cost.
    usage_event: dict[str, Any] | None = None
    #: The upstream said the answer is complete (``[DONE]``, ``message_stop``, ...).
    done: bool = False
    #: The output usage was reported (Anthropic: a ``message_delta`` arrived).
    output_reported: bool = False
    cut: bool = False
    client_gone: bool = False
    failure: UpstreamError | None = None
    #: What the client was sent, for an Idempotency-Key replay; None past REPLAY_BODY_LIMIT.
    sent: list[bytes] | None = field(default_factory=list)
    sent_bytes: int = 0
    #: Events relayed from the current upstream read, sent to the client as one message.
    out: list[bytes] = field(default_factory=list)

    def emit(self, event: bytes) -> None:
        self.out.append(event)


ErrorRenderer = Callable[[Scope, TollwayError], bytes]


def positive_int(payload: dict[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequest(f"{name} must be a positive integer")
    return value


class TokenRoute:
    """A plain ASGI endpoint for one token-billed route; subclasses fill in the protocol."""

    #: the gateway route (``/v1/messages``) and the path under the provider's base_url
    route: str = ""
    upstream_path: str = ""
    #: how errors this route answers itself read (the client library must understand them)
    render_error: ErrorRenderer = staticmethod(error_body)
    #: what ends the stream after the cost (OpenAI chat: ``data: [DONE]``, kept back until
    #: the request is settled)
    done_marker: bytes = b""
    #: tell the client, with :meth:`stream_error`, that a stream cut short is incomplete
    reports_cut: bool = False
    #: fields a request must carry (a request without one is refused with 400 naming it,
    #: before anything is held: an upstream may answer it 200 with a billed "empty" reply)
    required: tuple[str, ...] = ()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw: Gateway = scope["app"].state.gateway
        prepared = await admit(scope, send, self._prepare(gw, scope, receive),
                               render=self.render_error)
        if prepared is not None:
            await self._forward(gw, prepared, receive, send)

    # ------------------------------------------------------------------ protocol hooks

    def output_bound(self, payload: dict[str, Any], model_max: int) -> tuple[str | None,
                                                                             int | None]:
        """(the request field that bounds output, the bound) — the model's maximum when the
        client sets none."""
        raise NotImplementedError

    def choices(self, payload: dict[str, Any]) -> int:
        return 1

    def check_required(self, payload: dict[str, Any]) -> None:
        for name in self.required:
            if payload.get(name) is None:
                raise InvalidRequest(f"{name} is required", param=name)

    def streams(self, payload: dict[str, Any]) -> bool:
        return stream_flag(payload)

    def prepare_upstream(self, llm: LLMCall, payload: dict[str, Any]) -> None:
        """Adjust the payload sent upstream (the model name is already replaced)."""

    def upstream_headers(self, scope: Scope) -> dict[str, str]:
        return {}

    async def history(self, gw: Gateway, call: Call, payload: dict[str, Any]) -> int:
        """Tokens of the history a request continues upstream (held for beside its visible
        prompt); raises when it is not the caller's to continue. Stateless protocols: 0,
        without a statement."""
        return 0

    def read_answer(self, llm: LLMCall, obj: dict[str, Any]) -> None:
        """Note what a whole answer created (``llm.created_ids``)."""

    def collect(self, obj: dict[str, Any], out: list[str]) -> None:
        """The generated text of a whole (non-streamed) answer, for a local count."""

    def parse_usage(self, raw: Any) -> tuple[TokenUsage, int]:
        """(rating inputs, reasoning tokens) from the protocol's usage object."""
        raise NotImplementedError

    def answer_usage(self, obj: dict[str, Any]) -> Any:
        return obj.get("usage")

    def relay(self, llm: LLMCall, event: bytes, state: StreamState) -> bool:
        """Pass one stream event on (``state.emit``), reading what it says; False once the
        stream is over. What the events of one upstream read emit goes to the client as one
        message."""
        raise NotImplementedError

    def relay_events(self, llm: LLMCall, events: list[bytes], state: StreamState) -> bool:
        """Pass on the events of one upstream read (:meth:`relay` each); False once the
        stream is over."""
        for event in events:
            if not self.relay(llm, event, state):
                return False
        return True

    def drain(self, llm: LLMCall) -> None:
        """Read the text of the events relayed unparsed into ``llm.delivered`` (needed only
        for a local count)."""

    def stream_metered(self, llm: LLMCall, original: dict[str, Any],
                       state: StreamState) -> MeteredUsage:
        return self.meter(llm, original, state.usage)

    def stream_tail(self, llm: LLMCall, state: StreamState, metered: MeteredUsage,
                    cost: int) -> bytes:
        """What the client gets after the upstream's events: at least the cost, as an SSE
        comment every client ignores (after an error event if the stream was cut short)."""
        tail = b": tollway cost_usd=" + format_usd(cost).encode() + b"\n\n"
        if self.reports_cut and state.cut and not state.client_gone:
            why = state.failure.message if state.failure else "the upstream stream broke off"
            tail = self.stream_error(llm, UpstreamError(why)) + tail
        return tail

    def stream_error(self, llm: LLMCall, exc: TollwayError) -> bytes:
        """The event telling the client its stream failed before any output."""
        return b"data: " + self.render_error(llm.call.scope, exc) + b"\n\n"

    # ------------------------------------------------------------------ before forwarding

    async def _prepare(self, gw: Gateway, scope: Scope, receive: Receive) -> LLMCall | Replay:
        body = await read_body(receive, gw.max_body_bytes)
        key = await gw.authenticate(scope)
        payload = json_object(body)
        self.check_required(payload)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model is required", param="model")
        item, provider = gw.catalog.model(model, self.route)
        call = begin(gw, scope, key, item, self.route, body)
        call.render_error = self.render_error
        price = item.version.price
        assert isinstance(price, TokenPrice)  # token routes serve token-priced models only
        model_max = item.spec.max_output_tokens or 4096
        max_field, bound = self.output_bound(payload, model_max)
        lowered = None
        if max_field is not None and bound is not None and bound > model_max:
            # the model never generates more: hold (and send upstream) its maximum
            bound = lowered = payload[max_field] = model_max
        prompt = tokens.estimate_prompt(payload) + await self.history(gw, call, payload)
        llm = LLMCall(gw, call, payload, price, prompt, bound, max_field,
                      provider, choices=self.choices(payload), lowered_to=lowered)
        call.stream = self.streams(payload)
        amount = llm.hold_cost(llm.prompt_estimate, (bound or 0) * llm.choices)
        # TPM counts the estimated prompt at admission; settlement corrects it to the
        # reported input + output tokens
        result = await reserve(gw, call, amount, tokens=llm.prompt_estimate,
                               shrink=llm.affordable if max_field else None)
        if isinstance(result, Replay):
            return result
        if result.granted is not None:
            llm.lowered_to = int(result.granted)
            payload[max_field or "max_tokens"] = llm.lowered_to
        return llm

    # ------------------------------------------------------------------ forwarding

    async def _forward(self, gw: Gateway, llm: LLMCall, receive: Receive, send: Send) -> None:
        call = llm.call
        original = dict(llm.payload)
        payload = llm.payload
        self.prepare_upstream(llm, payload)
        headers = {"Content-Type": "application/json",
                   "Accept": "text/event-stream" if call.stream else "application/json",
                   **self.upstream_headers(call.scope)}

        def build(channel: Channel) -> UpstreamRequest:
            payload["model"] = channel.upstream_model or call.item.id
            return UpstreamRequest("POST", self.upstream_path, jsonio.dumps(payload),
                                   headers=headers, stream=call.stream)

        family = "anthropic" if self.route == "/v1/messages" else "openai"
        if call.trace is not None:
            call.trace.upstream_started(llm.provider)
        try:
            response = await failover.send(gw, call, family, build)
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
        await refuse_answer(llm.gw, llm.call, send, response.status, body,
                            response.content_type)

    async def _complete(self, llm: LLMCall, original: dict[str, Any],
                        response: UpstreamResponse, send: Send) -> None:
        call = llm.call
        try:
            raw = await response.read()
            obj = jsonio.loads(raw)
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
        call.reported_cost = reported_cost(raw)
        self.read_answer(llm, obj)
        metered = self.meter(llm, original, self.answer_usage(obj), answer=obj)
        charge = metering.rate(metered.usage, llm.price, call.ratio)
        await self._settle(llm, metered, charge, status=200,
                           response=(200, response.content_type, raw))
        await send_bytes(send, 200, raw, response.content_type.encode(),
                         headers=[(COST_HEADER, format_usd(charge.cost_nano_usd).encode()),
                                  *llm.extra_headers(), *call.rate_headers()])

    def meter(self, llm: LLMCall, original: dict[str, Any], raw_usage: Any, *,
              answer: dict[str, Any] | None = None) -> MeteredUsage:
        """The usage to bill: the upstream's, checked and bounded; else a local count (of a
        stream's delivered text, or of the whole ``answer``'s, read only then)."""
        bound = llm.lowered_to or llm.output_bound
        if bound is not None:
            bound *= llm.choices
        try:
            usage, reasoning = self.parse_usage(raw_usage)
            # Input as reported up to the model's context window, never a multiple of the
            # visible prompt: stateful requests (previous_response_id) and server-side tools
            # bill input Tollway never sees.
            return bounded(usage, reasoning, prompt_bound=llm.call.item.spec.input_bound,
                           completion_bound=bound)
        except InvalidUsage as exc:
            self.drain(llm)
            if answer is not None:
                self.collect(answer, llm.delivered)
            prompt = tokens.count_prompt(original)
            # The delivered text as a whole: counting each chunk on its own would bill the
            # upstream's chunking ("Hello " + "there " is 4 tokens apart, 2 together).
            output = tokens.count("".join(llm.delivered))
            if bound is not None:
                output = min(output, bound)
            return MeteredUsage(TokenUsage(prompt, output), 0, "estimated",
                                f"usage estimated locally: {exc}")

    async def _settle(self, llm: LLMCall, metered: MeteredUsage, charge: Charge, *,
                      status: int, response: tuple[int, str, bytes | None] | None,
                      note: str | None = None) -> None:
        """Book ``charge`` (``metering.rate`` of ``metered``) with the usage record."""
        call = llm.call
        usage = metered.usage
        record = call.record(type_="consume", status=status, usage_source=metered.source,
                             input_tokens=usage.prompt_tokens, cached=usage.cached_tokens,
                             cache_write=usage.cache_write_tokens,
                             cache_write_1h=usage.cache_write_1h_tokens,
                             output=usage.completion_tokens, reasoning=metered.reasoning_tokens,
                             note="; ".join(n for n in (metered.note, note) if n) or None,
                             tool_calls=usage.tool_calls)
        await settle(llm.gw, call, charge=charge, record=record, response=response,
                     remember=llm.created_ids)

    # ------------------------------------------------------------------ streaming

    async def _stream(self, llm: LLMCall, original: dict[str, Any], response: UpstreamResponse,
                      receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"),
                                (b"cache-control", b"no-cache"), *llm.extra_headers(),
                                *llm.call.rate_headers()]})
        # keep a copy of what is sent only when an Idempotency-Key replay may need it
        state = StreamState(sent=[] if llm.call.client_key is not None else None)
        pump = asyncio.ensure_future(self._pump(llm, response, send, state))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not pump.done():  # the client went away
            state.client_gone = True
            if llm.gw.stream_disconnect == "finish":
                # read the upstream on to its usage (nothing more is sent), within the read
                # timeout, and bill exactly what it reports
                await asyncio.wait({pump}, timeout=llm.gw.read_timeout_s)
            pump.cancel()  # cancel: stop reading, bill what was delivered
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await asyncio.shield(self._finish_stream(llm, original, state, send))

    async def _pump(self, llm: LLMCall, response: UpstreamResponse, send: Send,
                    state: StreamState) -> None:
        splitter = EventSplitter()
        try:
            async for chunk in response.chunks():
                more = self.relay_events(llm, splitter.feed(chunk), state)
                if state.out:
                    body = b"".join(state.out)
                    state.out.clear()
                    if not state.client_gone:
                        await send_chunk(send, body, state)
                if not more:
                    return
            state.cut = splitter.rest() != b"" or not state.done
        except UpstreamError as exc:
            state.failure = exc
            state.cut = True

    async def _finish_stream(self, llm: LLMCall, original: dict[str, Any], state: StreamState,
                             send: Send) -> None:
        call = llm.call
        if state.usage is None:
            self.drain(llm)
        if not any(llm.delivered) and state.usage is None:
            exc = state.failure or UpstreamError("the upstream stream ended before any output")
            await fail(llm.gw, call, send, exc, status=exc.status, send_response=False)
            await self._end_with_error(llm, exc, state, send)
            return
        metered = self.stream_metered(llm, original, state)
        note = None
        if state.client_gone and state.done:
            note = ("the client disconnected mid-stream; the upstream was read to its end "
                    "(TOLLWAY_STREAM_DISCONNECT=finish)")
        elif state.client_gone:
            note = "the client disconnected mid-stream"
        elif state.cut:
            note = state.failure.message if state.failure else "the upstream stream broke off"
        charge = metering.rate(metered.usage, llm.price, call.ratio)
        tail = self.stream_tail(llm, state, metered, charge.cost_nano_usd)
        done = self.done_marker if state.done else b""
        # A retry with the same Idempotency-Key gets this stream back (without it the key
        # stayed "in progress" for 24 hours).
        replay = None
        if call.client_key is not None and state.sent is not None:
            replay = (200, "text/event-stream", b"".join(state.sent) + tail + done)
        try:
            await self._settle(llm, metered, charge, status=200, response=replay, note=note)
        except StorageUnavailable as exc:
            # The upstream answered but the charge cannot be recorded. The client is told so,
            # never a cost that is not in the books; the hold stays open until the reaper
            # releases it, so nothing is charged for this stream.
            log.warning("request %s: settling the stream failed, the database is unavailable; "
                        "its hold is left to expire", call.request_id)
            await self._end_with_error(llm, exc, state, send)
            return
        except BaseException:
            if not state.client_gone:
                await send({"type": "http.response.body", "body": done})
            raise
        if not state.client_gone:
            await send({"type": "http.response.body", "body": tail + done})

    async def _end_with_error(self, llm: LLMCall, exc: TollwayError, state: StreamState,
                              send: Send) -> None:
        """End a stream whose headers are sent with an error event in the route's error
        shape (its code goes to the access log and metrics)."""
        llm.call.scope[ERROR_CODE] = exc.code
        if state.client_gone:
            return
        await send_chunk(send, self.stream_error(llm, exc), state)
        await send({"type": "http.response.body", "body": b""})


async def send_chunk(send: Send, body: bytes, state: StreamState) -> None:
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
