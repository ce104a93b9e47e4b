"""How the OpenAI stream relay reads chunks (``LLMRoute.relay``): only a chunk that can carry
usage is parsed; content chunks pass unread and their text is read (``drain``) only when the
stream ends without usage, to count it locally. The bytes relayed are the upstream's, in
order; the usage chunk is kept back to be sent after settlement."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from tollway.gateway.llm import LLMRoute
from tollway.gateway.metered import LLMCall, StreamState


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _chunk(text: str, **extra: Any) -> bytes:
    return _event({"id": "c", "object": "chat.completion.chunk",
                   "choices": [{"index": 0, "delta": {"content": text}}], **extra})


def _llm() -> LLMCall:
    call = SimpleNamespace(mark_first_byte=lambda: None)
    return LLMCall(gw=None, call=call, payload={}, price=None, prompt_estimate=1,  # type: ignore[arg-type]
                   output_bound=64, max_field="max_tokens", provider="p")


def test_content_chunks_pass_unread_and_the_usage_chunk_is_parsed_and_kept_back() -> None:
    route, llm, state = LLMRoute("chat"), _llm(), StreamState()
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    events = [_chunk("Hello", usage=None), _chunk(' "usage": {"x": 1} ', usage=None),
              b": keep-alive\n\n", _chunk("!"),
              _event({"id": "c", "choices": [], "usage": usage})]
    assert all(route.relay(llm, event, state) for event in events)
    assert route.relay(llm, b"data: [DONE]\n\n", state) is False and state.done
    assert state.out == events[:4]  # unchanged, in order; the usage chunk kept back
    assert state.usage == usage and state.usage_event is not None
    assert llm.delivered == [] and len(llm.unparsed) == 3  # nothing parsed but the usage
    route.drain(llm)
    assert "".join(llm.delivered) == 'Hello "usage": {"x": 1} !' and llm.unparsed == []


def test_a_usage_that_is_not_null_is_always_read() -> None:
    route, llm, state = LLMRoute("chat"), _llm(), StreamState()
    route.relay(llm, _chunk("hi", usage={"prompt_tokens": 2, "completion_tokens": 1}), state)
    assert state.usage == {"prompt_tokens": 2, "completion_tokens": 1}
    assert llm.delivered == ["hi"]
    route.relay(llm, _event({"choices": [], "usage": 7}), state)  # nonsense: read, kept back
    assert state.usage == 7


def test_a_long_stream_without_usage_keeps_a_bounded_backlog() -> None:
    route, llm, state = LLMRoute("chat"), _llm(), StreamState()
    for _ in range(5000):
        route.relay(llm, _chunk("word "), state)
    assert llm.unparsed_bytes <= 256 * 1024
    route.drain(llm)
    assert "".join(llm.delivered) == "word " * 5000
