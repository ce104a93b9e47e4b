"""``POST /v1/responses``: the OpenAI Responses API, forwarded to an OpenAI-compatible
upstream's ``/responses``.

Usage is read from the answer's ``usage`` (streamed: from the ``response.completed`` event, or
``response.incomplete`` / ``response.failed``): ``input_tokens`` includes
``input_tokens_details.cached_tokens`` and ``output_tokens`` includes
``output_tokens_details.reasoning_tokens`` (:meth:`TokenUsage.from_responses`). Streamed events
pass through unchanged and in order; the cost follows as an SSE comment.
"""

from __future__ import annotations

import functools
from typing import Any

from tollway.errors import InvalidRequest, TollwayError, UnknownResponse
from tollway.gateway import jsonio
from tollway.gateway.asgi import error_body
from tollway.gateway.calls import Call
from tollway.gateway.metered import LLMCall, StreamState, TokenRoute, positive_int
from tollway.gateway.sse import event_json
from tollway.gateway.state import Gateway
from tollway.gateway.usage import TOOL_CALLS_KEY, parse_responses_usage, responses_tool_calls
from tollway.pricing.rating import TokenUsage
from tollway.store import responses as response_store

#: Events that end a response and carry its usage.
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")
#: Events whose ``delta`` is generated output (for a local count if usage never comes).
DELTA_EVENTS = ("response.output_text.delta", "response.refusal.delta",
                "response.function_call_arguments.delta",
                "response.reasoning_summary_text.delta", "response.reasoning_text.delta")


class ResponsesRoute(TokenRoute):
    route = "/v1/responses"
    upstream_path = "/responses"
    reports_cut = True

    def check_required(self, payload: dict[str, Any]) -> None:
        """``input``, unless the conversation lives upstream (``previous_response_id``,
        ``conversation``) or a stored ``prompt`` supplies it."""
        if payload.get("input") is None and not any(
                payload.get(k) for k in ("previous_response_id", "conversation", "prompt")):
            raise InvalidRequest("input is required", param="input")

    async def history(self, gw: Gateway, call: Call, payload: dict[str, Any]) -> int:
        """The remembered input + output tokens of the response (or conversation) this
        request continues; another account's id is refused as unknown (404, nothing held or
        charged). An id Tollway never relayed is the upstream's to judge: no history."""
        continued = [(name, value) for name, value in (
            ("previous_response_id", payload.get("previous_response_id")),
            ("conversation", _conversation_id(payload))) if isinstance(value, str) and value]
        if not continued:
            return 0
        account = call.key.account_id
        total = 0
        for name, value in continued:
            known = await gw.ctx.read(functools.partial(response_store.recall,
                                                        response_id=value))
            if known is None:
                continue
            if known.account_id != account:
                raise UnknownResponse(f"{name} {value!r} was not found", param=name)
            total = max(total, known.context_tokens)  # a conversation includes its responses
        return total

    def read_answer(self, llm: LLMCall, obj: dict[str, Any]) -> None:
        if llm.payload.get("store") is not False:
            llm.created_ids = _created_ids(obj)

    def stream_error(self, llm: LLMCall, exc: TollwayError) -> bytes:
        """The Responses API's ``error`` event, with Tollway's error object beside (which is
        what makes the openai package raise)."""
        body = jsonio.loads(error_body(llm.call.scope, exc))
        event = {"type": "error", "code": exc.code, "message": exc.message, "param": None,
                 **body}
        return b"event: error\ndata: " + jsonio.dumps(event) + b"\n\n"

    def output_bound(self, payload: dict[str, Any], model_max: int) -> tuple[str | None,
                                                                             int | None]:
        value = positive_int(payload, "max_output_tokens")
        return "max_output_tokens", model_max if value is None else value

    def collect(self, obj: dict[str, Any], out: list[str]) -> None:
        for item in obj.get("output") or []:
            if not isinstance(item, dict):
                continue
            for key in ("arguments", "name"):
                if isinstance(item.get(key), str):
                    out.append(item[key])
            for part in item.get("content") or item.get("summary") or []:
                if isinstance(part, dict):
                    for key in ("text", "refusal"):
                        if isinstance(part.get(key), str):
                            out.append(part[key])

    def parse_usage(self, raw: Any) -> tuple[TokenUsage, int]:
        return parse_responses_usage(raw)

    def answer_usage(self, obj: dict[str, Any]) -> Any:
        return _with_tool_calls(obj)

    def relay(self, llm: LLMCall, event: bytes, state: StreamState) -> bool:
        obj = event_json(event)
        if isinstance(obj, dict):
            kind = obj.get("type")
            if kind in DELTA_EVENTS and isinstance(obj.get("delta"), str):
                llm.delivered.append(obj["delta"])
            elif kind in FINAL_EVENTS:
                response = obj.get("response")
                if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                    state.usage = _with_tool_calls(response)
                if isinstance(response, dict):
                    self.read_answer(llm, response)
                state.done = True
        llm.call.mark_first_byte()
        state.emit(event)
        return True


def _with_tool_calls(response: dict[str, Any]) -> Any:
    """A Response's usage, with the hosted tool calls of its ``output`` beside (billed per
    call at the catalog's ``tool_calls`` prices)."""
    usage = response.get("usage")
    calls = responses_tool_calls(response.get("output"))
    if not calls or not isinstance(usage, dict):
        return usage
    return {**usage, TOOL_CALLS_KEY: calls}


def _conversation_id(payload: dict[str, Any]) -> Any:
    """``conversation``: an id, or ``{"id": ...}``."""
    conversation = payload.get("conversation")
    return conversation.get("id") if isinstance(conversation, dict) else conversation


def _created_ids(response: dict[str, Any]) -> tuple[str, ...]:
    """The ids a later request may continue: the Response's own, and its conversation's."""
    ids = [response.get("id"), _conversation_id(response)]
    return tuple(i for i in ids if isinstance(i, str) and i and len(i) <= 255)
