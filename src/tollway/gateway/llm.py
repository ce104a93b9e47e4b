"""OpenAI-compatible LLM routes: chat completions (streaming included), completions and
embeddings, on the shared lifecycle of :mod:`.metered`.

Usage is OpenAI's (``prompt_tokens`` includes cached tokens, ``completion_tokens`` reasoning
tokens). Streams ask the upstream for usage (``stream_options.include_usage``); the usage chunk
is kept back, settled, and sent with the cost under ``tollway``, then ``[DONE]``.
"""

from __future__ import annotations

import re
from typing import Any

from tollway.errors import InvalidRequest
from tollway.gateway import jsonio
from tollway.gateway.asgi import stream_flag
from tollway.gateway.metered import (
    LLMCall,
    StreamState,
    TokenRoute,
    positive_int,
)
from tollway.gateway.sse import event_data
from tollway.gateway.usage import MeteredUsage, parse_openai_usage
from tollway.money import format_usd
from tollway.pricing.rating import TokenUsage
from tollway.pricing.upstream_cost import reported_cost

#: A chunk that may carry usage: a ``"usage"`` member that is not ``null`` (OpenAI sends
#: ``"usage": null`` on every other chunk of a stream that asked for usage). Inside a JSON
#: string the quotes would be escaped, so text that merely mentions usage does not match; a
#: false match only costs a parse.
_USAGE = re.compile(rb'"usage"\s*:\s*[^\sn]')
#: How much unread stream data a request keeps before reading it for its text.
UNPARSED_LIMIT = 256 * 1024

ROUTES = {"chat": "/chat/completions", "completions": "/completions",
          "embeddings": "/embeddings"}
REQUIRED = {"chat": ("messages",), "completions": ("prompt",), "embeddings": ("input",)}


class LLMRoute(TokenRoute):
    """A plain ASGI endpoint for one of :data:`ROUTES`."""

    done_marker = b"data: [DONE]\n\n"

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.upstream_path = ROUTES[kind]
        self.route = "/v1" + self.upstream_path
        self.required = REQUIRED[kind]

    def choices(self, payload: dict[str, Any]) -> int:
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
        prompt = payload.get("prompt")
        if self.kind == "completions" and isinstance(prompt, list) and prompt and all(
                isinstance(p, str | list) for p in prompt):
            # a batch: the upstream completes every prompt (strings or token arrays), n each
            count *= len(prompt)
        return count

    def streams(self, payload: dict[str, Any]) -> bool:
        wanted = stream_flag(payload)  # checked on every kind: a bad flag is the client's error
        return self.kind != "embeddings" and wanted

    def output_bound(self, payload: dict[str, Any], model_max: int) -> tuple[str | None,
                                                                             int | None]:
        if self.kind == "embeddings":
            return None, None
        fields = ("max_completion_tokens", "max_tokens") if self.kind == "chat" else (
            "max_tokens",)
        for name in fields:
            value = positive_int(payload, name)
            if value is not None:
                return name, value
        return fields[-1], model_max

    def prepare_upstream(self, llm: LLMCall, payload: dict[str, Any]) -> None:
        if llm.call.stream:
            options = payload.get("stream_options")
            options = dict(options) if isinstance(options, dict) else {}
            llm.client_wants_usage = options.get("include_usage") is True
            options["include_usage"] = True
            payload["stream_options"] = options

    def collect(self, obj: dict[str, Any], out: list[str]) -> None:
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict):
                _collect(choice.get("message") or {}, out)
                if isinstance(choice.get("text"), str):
                    out.append(choice["text"])

    def parse_usage(self, raw: Any) -> tuple[TokenUsage, int]:
        usage, reasoning = parse_openai_usage(raw)
        if self.kind == "embeddings":
            usage = TokenUsage(usage.prompt_tokens, 0, usage.cached_tokens,
                               usage.cache_write_tokens, usage.cache_write_1h_tokens)
        return usage, reasoning

    def relay_events(self, llm: LLMCall, events: list[bytes], state: StreamState) -> bool:
        """The content chunks that lead a read (most of a stream) go on as one block, each
        checked with substring tests only: a data event without ``"usage"`` (so its data
        cannot match :data:`_USAGE`) and without ``[DONE]`` is passed on unread, as
        :meth:`relay` would pass it. From the first event that might be either, each goes
        through :meth:`relay`."""
        plain = 0
        for event in events:
            if not event.startswith(b"data:") or b'"usage"' in event or b"[DONE]" in event:
                break
            plain += 1
        if plain == 0:
            return super().relay_events(llm, events, state)
        llm.call.mark_first_byte()
        block = events if plain == len(events) else events[:plain]
        self._unread(llm, block)
        state.out.extend(block)
        return plain == len(events) or super().relay_events(llm, events[plain:], state)

    def relay(self, llm: LLMCall, event: bytes, state: StreamState) -> bool:
        data = event_data(event)
        if data is None:
            state.emit(event)
            return True
        if data.strip() == b"[DONE]":
            state.done = True
            return False
        if _USAGE.search(data) is None:
            # A content chunk (most of a stream: `"usage": null` or none): passed on unread.
            # Its text is needed only if the stream ends without usage (``drain``).
            llm.call.mark_first_byte()
            self._unread(llm, [event])
            state.emit(event)
            return True
        try:
            obj = jsonio.loads(data)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("usage") and b'"cost"' in data:
            llm.call.reported_cost = reported_cost(data)
        if isinstance(obj, dict) and obj.get("usage") and not obj.get("choices"):
            state.usage, state.usage_event = obj["usage"], obj  # settled first, then sent
            return True
        if isinstance(obj, dict):
            if obj.get("usage"):
                state.usage = obj["usage"]
            _collect_chunk(obj, llm.delivered)
        llm.call.mark_first_byte()
        state.emit(event)
        return True

    def _unread(self, llm: LLMCall, events: list[bytes]) -> None:
        """Keep content events passed on unread, for :meth:`drain`; past
        :data:`UNPARSED_LIMIT` they are read at once (a long stream's backlog stays bounded)."""
        llm.unparsed.extend(events)
        llm.unparsed_bytes += sum(map(len, events))
        if llm.unparsed_bytes > UNPARSED_LIMIT:
            self.drain(llm)

    def drain(self, llm: LLMCall) -> None:
        for event in llm.unparsed:
            data = event_data(event)
            if data is None:
                continue
            try:
                obj = jsonio.loads(data)
            except ValueError:
                continue
            if isinstance(obj, dict):
                _collect_chunk(obj, llm.delivered)
        llm.unparsed.clear()
        llm.unparsed_bytes = 0

    def stream_tail(self, llm: LLMCall, state: StreamState, metered: MeteredUsage,
                    cost: int) -> bytes:
        tail = b""
        if state.usage_event is not None and llm.client_wants_usage:
            usage_event = dict(state.usage_event)
            usage_event["tollway"] = {"cost_usd": format_usd(cost),  # a string, never a float
                                      "request_id": llm.call.request_id,
                                      "usage_source": metered.source}
            tail += b"data: " + jsonio.dumps(usage_event) + b"\n\n"
        return tail + super().stream_tail(llm, state, metered, cost)


def _collect_chunk(obj: dict[str, Any], out: list[str]) -> None:
    """The generated text of one stream chunk."""
    for choice in obj.get("choices") or []:
        if isinstance(choice, dict):
            _collect(choice.get("delta") or {}, out)
            if isinstance(choice.get("text"), str):
                out.append(choice["text"])


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
