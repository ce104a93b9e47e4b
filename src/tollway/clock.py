"""The one wall clock: milliseconds since the epoch, as integers.

Code that books money or records usage takes its time as an argument (``at_ms``) so that one
operation is stamped by one clock; the server's ``Context.clock`` (tests pass one they move) is
what the HTTP layers hand down, and ``now_ms`` is the default behind it and the CLI's."""

from __future__ import annotations

import time
from collections.abc import Callable

#: A source of "now" in milliseconds since the epoch.
Clock = Callable[[], int]


def now_ms() -> int:
    return time.time_ns() // 1_000_000
