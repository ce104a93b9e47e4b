"""``event_data`` reads the common event (one ``data:`` line) without splitting it into lines;
whatever the event, it reads the same as the line-by-line rule of the SSE format it replaced.
The splitter finds the events the boundary pattern finds, however the stream is cut."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.gateway.sse import EventSplitter, event_data


def line_by_line(event: bytes) -> bytes | None:
    """The joined ``data:`` lines, each without its leading spaces."""
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


PIECES = st.sampled_from([b"data:", b"data: ", b"data:  ", b"event: usage", b": comment",
                          b"\n", b"\r", b"\r\n", b"\n\n", b"x", b" ", b'{"usage":null}',
                          b"[DONE]", b"\x0b", b"\x1c", b"\xc3\xa9"])


@settings(max_examples=1000)
@given(st.lists(PIECES, max_size=12))
def test_event_data_reads_as_line_by_line(pieces: list[bytes]) -> None:
    event = b"".join(pieces)
    assert event_data(event) == line_by_line(event)


def test_event_data_examples() -> None:
    assert event_data(b'data: {"a":1}\n\n') == b'{"a":1}'
    assert event_data(b"data:[DONE]\r\n\r\n") == b"[DONE]"
    assert event_data(b"data: a\ndata: b\n\n") == b"a\nb"
    assert event_data(b"event: ping\ndata: x\n\n") == b"x"
    assert event_data(b": keep-alive\n\n") is None


def split_by_pattern(chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """The events of ``chunks`` as the boundary pattern alone finds them, and the rest."""
    data = b"".join(chunks)
    events, start = [], 0
    for match in re.finditer(rb"\r\n\r\n|\n\n|\r\r", data):
        events.append(data[start:match.end()])
        start = match.end()
    return events, data[start:]


@settings(max_examples=1000)
@given(st.lists(st.lists(PIECES, max_size=8).map(b"".join), max_size=6))
def test_the_splitter_finds_the_events_the_boundary_pattern_finds(chunks: list[bytes]) -> None:
    """Fed in any pieces, with CR or without (LF-only data takes ``bytes.split``), the
    splitter gives the same events, in order, and keeps the same unfinished rest."""
    splitter = EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    assert (events, splitter.rest()) == split_by_pattern(chunks)
