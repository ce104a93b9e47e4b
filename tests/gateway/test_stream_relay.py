"""How the OpenAI stream relay reads chunks (``LLMRoute.relay``): only a chunk that can carry
usage is parsed; content chunks pass unread and their text is read (``drain``) only when the
stream ends without usage, to count it locally. The bytes relayed are the upstream's, in
order; the usage chunk is kept back to be sent after settlement. A read's leading content
chunks go on as a block (``relay_events``), as if relayed one by one."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

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


EVENTS = st.sampled_from([
    _chunk("Hello"), _chunk(" world", usage=None), _chunk(' "usage": {"x": 1} '),
    _chunk("[DONE] is just text"), b": keep-alive\n\n", b"event: ping\ndata: {}\n\n",
    b"data: not json\n\n", _chunk("hi", usage={"prompt_tokens": 2, "completion_tokens": 1}),
    _event({"id": "c", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}),
    b"data: [DONE]\n\n", b"data:[DONE]\n\n"])


def _relayed(events: list[bytes], *, one_by_one: bool) -> tuple[Any, ...]:
    route, llm, state = LLMRoute("chat"), _llm(), StreamState()
    firsts: list[int] = []
    llm.call.mark_first_byte = lambda: firsts.append(len(state.out))  # type: ignore[attr-defined]
    if one_by_one:
        more = True
        for event in events:
            if not route.relay(llm, event, state):
                more = False
                break
    else:
        more = route.relay_events(llm, events, state)
    route.drain(llm)
    return (more, state.out, state.usage, state.usage_event, state.done, llm.delivered,
            bool(firsts))


@settings(max_examples=500)
@given(st.lists(EVENTS, max_size=12))
def test_a_read_is_relayed_as_its_events_one_by_one(events: list[bytes]) -> None:
    """``relay_events`` passes the content chunks that lead a read on as a block: the bytes
    sent, the usage kept back, the end of the stream, the text read for a local count and
    the first byte's mark are what relaying each event on its own gives."""
    assert _relayed(events, one_by_one=False) == _relayed(events, one_by_one=True)
