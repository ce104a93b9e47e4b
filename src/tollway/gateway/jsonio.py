"""JSON on the request path: ``orjson`` (several times faster than ``json`` both ways), with
the standard library as the fallback for what orjson refuses and ``json`` accepts.

orjson refuses ``NaN``/``Infinity`` and lone surrogates, and reads an integer beyond 64 bits
as a *float* (``1e+29``): a text with a run of 20 or more digits (every integer orjson could
turn into a float has one) is read by ``json``, so ``max_tokens: 10**30`` still reaches the
hold's "lowered to what the balance affords" path and a huge token count stays an integer the
usage checks refuse. The gateway's answers to such requests do not change. No money is
parsed here: prices, ratios and balances never pass through these functions, and the cost the
gateway adds to an answer is a decimal string (``format_usd``), which both libraries leave a
string. The admin API keeps ``json.loads(parse_float=Decimal)`` (``runtime/http.py``).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

#: Every byte to ``0`` if it is an ASCII digit, else to a space: a run of 20 digits is then a
#: substring search (the regular expression ``[0-9]{20}`` costs ten times as much: it tries a
#: match at every digit; ``tests/gateway/test_jsonio.py`` proves the two agree).
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_RUN = b"0" * 20


def has_long_number(data: bytes) -> bool:
    """Whether ``data`` holds a run of 20 or more ASCII digits (``[0-9]{20}``)."""
    return _RUN in data.translate(_DIGITS)


def loads(data: bytes) -> Any:
    """Parse JSON; raises ``ValueError`` (as ``json.loads`` does) when it is not JSON."""
    if not has_long_number(data):
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def dumps(value: Any) -> bytes:
    """Serialise to compact UTF-8 JSON bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:  # an integer beyond 64 bits, a subclass orjson does not know
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
