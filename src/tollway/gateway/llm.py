"""OpenAI-compatible LLM routes: chat completions (streaming included), completions and
embeddings, on the shared lifecycle of :mod:`.metered`.

Usage is OpenAI's (``prompt_tokens`` includes cached tokens, ``completion_tokens`` reasoning
tokens). Streams ask the upstream for usage (``stream_options.include_usage``); the usage chunk
is kept back, settled, and sent with the cost under ``tollway``, then ``[DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Send

from tollway.errors import InvalidRequest
from tollway.gateway.asgi import stream_flag
from tollway.gateway.metered import (
    LLMCall,
    StreamState,
    TokenRoute,
    positive_int,
    send_chunk,
)
from tollway.gateway.sse import event_data
from tollway.gateway.usage import MeteredUsage, parse_openai_usage
from tollway.money import format_usd
from tollway.pricing.rating import TokenUsage
from tollway.pricing.upstream_cost import reported_cost

ROUTES = {"chat": "/chat/completions", "completions": "/completions",
          "embeddings": "/embeddings"}


class LLMRoute(TokenRoute):
    """A plain ASGI endpoint for one of :data:`ROUTES`."""

    done_marker = b"data: [DONE]\n\n"

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.upstream_path = ROUTES[kind]
        self.route = "/v1" + self.upstream_path

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

    async def relay(self, llm: LLMCall, event: bytes, send: Send, state: StreamState) -> bool:
        data = event_data(event)
        if data is None:
            await send_chunk(send, event, state)
            return True
        if data.strip() == b"[DONE]":
            state.done = True
            return False
        try:
            obj = json.loads(data)
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
            for choice in obj.get("choices") or []:
                if isinstance(choice, dict):
                    _collect(choice.get("delta") or {}, llm.delivered)
                    if isinstance(choice.get("text"), str):
                        llm.delivered.append(choice["text"])
        llm.call.mark_first_byte()
        await send_chunk(send, event, state)
        return True

    def stream_tail(self, llm: LLMCall, state: StreamState, metered: MeteredUsage,
                    cost: int) -> bytes:
        tail = b""
        if state.usage_event is not None and llm.client_wants_usage:
            usage_event = dict(state.usage_event)
            usage_event["tollway"] = {"cost_usd": format_usd(cost),
                                      "request_id": llm.call.request_id,
                                      "usage_source": metered.source}
            tail += b"data: " + json.dumps(usage_event).encode() + b"\n\n"
        return tail + super().stream_tail(llm, state, metered, cost)


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
