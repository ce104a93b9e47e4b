"""``POST /v1/messages``: the Anthropic Messages API, so Claude clients work with only a base
URL change (``x-api-key`` or ``Authorization: Bearer`` with a Tollway key).

Billing follows Anthropic's usage semantics, converted explicitly
(:meth:`TokenUsage.from_anthropic`): ``input_tokens`` excludes cache reads and cache writes;
writes are 5-minute or 1-hour (``cache_creation.ephemeral_*``), priced apart. A stream spreads
usage over two events: ``message_start`` (input and cache counts) and ``message_delta``
(cumulative output). Every event is passed through unchanged and in order; the cost follows as
an SSE comment. A stream cut after ``message_start`` is billed for what was delivered: the
input it reported plus the output counted locally, marked ``estimated``.

Errors this route answers itself use Anthropic's shape, so the client library raises its own
exception types, with Tollway's ``code`` and ``request_id`` beside::

    {"type": "error", "error": {"type": "authentication_error", "message": "...",
                                "code": "invalid_api_key", "request_id": "req_..."},
     "request_id": "req_..."}
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from starlette.types import Scope

from tollway import tokens
from tollway.errors import InvalidRequest, TollwayError
from tollway.gateway.asgi import header
from tollway.gateway.metered import LLMCall, StreamState, TokenRoute, positive_int
from tollway.gateway.sse import event_json
from tollway.gateway.usage import MeteredUsage, parse_anthropic_usage
from tollway.pricing.rating import TokenUsage
from tollway.runtime.observe import ERROR_CODE, REQUEST_ID, error_json

DEFAULT_VERSION = "2023-06-01"


def anthropic_error(scope: Scope, exc: TollwayError) -> bytes:
    """Anthropic's error shape, whatever the path (``observe.error_json``)."""
    scope[ERROR_CODE] = exc.code
    return error_json("/v1/messages", scope.get(REQUEST_ID), exc.status, exc.type, exc.code,
                      exc.message, exc.param)


class MessagesRoute(TokenRoute):
    route = "/v1/messages"
    upstream_path = "/messages"
    render_error = staticmethod(anthropic_error)
    reports_cut = True
    required = ("messages",)

    def output_bound(self, payload: dict[str, Any], model_max: int) -> tuple[str | None,
                                                                             int | None]:
        value = positive_int(payload, "max_tokens")
        if value is None:
            raise InvalidRequest("max_tokens is required")
        return "max_tokens", value

    def upstream_headers(self, scope: Scope) -> dict[str, str]:
        headers = {"anthropic-version": header(scope, b"anthropic-version") or DEFAULT_VERSION}
        beta = header(scope, b"anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
        return headers

    def collect(self, obj: dict[str, Any], out: list[str]) -> None:
        for block in obj.get("content") or []:
            if isinstance(block, dict):
                _collect_block(block, out)

    def parse_usage(self, raw: Any) -> tuple[TokenUsage, int]:
        return parse_anthropic_usage(raw), 0

    def relay(self, llm: LLMCall, event: bytes, state: StreamState) -> bool:
        obj = event_json(event)
        if isinstance(obj, dict):
            kind = obj.get("type")
            if kind == "message_start":
                message = obj.get("message")
                usage = message.get("usage") if isinstance(message, dict) else None
                if isinstance(usage, dict):
                    state.usage = dict(usage)
            elif kind == "message_delta":
                usage = obj.get("usage")
                if isinstance(usage, dict):  # cumulative counts: the latest wins
                    merged = dict(state.usage or {})
                    merged.update({k: v for k, v in usage.items() if v is not None})
                    state.usage = merged
                    state.output_reported = "output_tokens" in usage
            elif kind == "content_block_start":
                block = obj.get("content_block")
                if isinstance(block, dict):
                    _collect_block(block, llm.delivered)
            elif kind == "content_block_delta":
                delta = obj.get("delta")
                if isinstance(delta, dict):
                    _collect_block(delta, llm.delivered)
            elif kind == "message_stop":
                state.done = True
        llm.call.mark_first_byte()
        state.emit(event)
        return True

    def stream_metered(self, llm: LLMCall, original: dict[str, Any],
                       state: StreamState) -> MeteredUsage:
        if state.usage is not None and not state.output_reported:
            # Cut after message_start: its input counts as reported, the output as delivered.
            output = tokens.count("".join(llm.delivered))
            metered = self.meter(llm, original, {**state.usage, "output_tokens": output})
            if metered.source != "estimated":  # capped too: the output is our own count
                why = "output counted locally: the stream ended without message_delta usage"
                return replace(metered, source="estimated",
                               note="; ".join(n for n in (why, metered.note) if n))
            return metered
        return self.meter(llm, original, state.usage)

    def stream_error(self, llm: LLMCall, exc: TollwayError) -> bytes:
        return b"event: error\ndata: " + anthropic_error(llm.call.scope, exc) + b"\n\n"


def _collect_block(block: dict[str, Any], out: list[str]) -> None:
    """Generated text of a content block or delta (text, thinking, tool input)."""
    for key in ("text", "thinking", "partial_json", "name"):
        value = block.get(key)
        if isinstance(value, str):
            out.append(value)
    if block.get("type") == "tool_use" and isinstance(block.get("input"), dict) \
            and block["input"]:
        out.append(json.dumps(block["input"]))  # counted: keep the spelling
