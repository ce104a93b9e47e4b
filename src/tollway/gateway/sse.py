"""Server-sent events: split an upstream byte stream into whole events without copying more
than the unfinished tail, and read an event's ``data`` field.

The unfinished tail is bounded: an upstream that never ends an event (no blank line) would
otherwise make the gateway buffer, and rescan, everything it sends."""

from __future__ import annotations

import re
from typing import Any

from tollway.errors import UpstreamError
from tollway.gateway import jsonio

_BOUNDARY = re.compile(rb"\r\n\r\n|\n\n|\r\r")
#: The longest single event the gateway accepts (an LLM chunk is a few hundred bytes).
MAX_EVENT_BYTES = 1024 * 1024


class EventSplitter:
    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._tail = b""
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[bytes]:
        """Whole events (each with its blank-line terminator) completed by ``chunk``."""
        data = self._tail + chunk if self._tail else chunk
        if b"\r" not in data:
            # The common stream (LF only): ``bytes.split`` finds the same boundaries as the
            # regular expression (leftmost, not overlapping) at a fraction of its cost.
            *parts, tail = data.split(b"\n\n")
            events = [part + b"\n\n" for part in parts]
        else:
            events = []
            start = 0
            for match in _BOUNDARY.finditer(data):
                events.append(data[start:match.end()])
                start = match.end()
            tail = data[start:]
        self._tail = tail
        if len(tail) > self._max:
            self._tail = b""
            raise UpstreamError(f"the upstream sent an event longer than {self._max} bytes")
        return events

    def rest(self) -> bytes:
        """What arrived after the last complete event (a stream cut mid-event)."""
        tail, self._tail = self._tail, b""
        return tail


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` lines of an event, or None if it has none (a comment)."""
    if event.startswith(b"data:"):  # the common event, one data line: no split
        data = event[5:].lstrip(b" ").rstrip(b"\r\n")
        if b"\n" not in data and b"\r" not in data:
            return data
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def event_json(event: bytes) -> Any:
    """An event's data parsed as JSON; None for a comment or data that is not JSON."""
    data = event_data(event)
    if data is None:
        return None
    try:
        return jsonio.loads(data)
    except ValueError:
        return None
