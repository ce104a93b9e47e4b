"""JSON on the request path (``gateway/jsonio.py``): a text with a run of 20 or more digits is
read by ``json``, so an integer beyond 64 bits stays an integer (orjson would read it as a
float); the run is found by a byte translation and a substring search, which agree with the
regular expression ``[0-9]{20}`` on every input."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.gateway import jsonio

PIECES = st.sampled_from([b"0", b"1", b"9", b"12345", b"9" * 19, b"8" * 20, b" ", b"a", b"-",
                          b".", b"e", b"\xd9", b"\xb0", b"\x00", b'"', b"\xef\xbc\x91"])


@settings(max_examples=1000)
@given(st.lists(PIECES, max_size=30).map(b"".join) | st.binary(max_size=64))
def test_a_long_number_is_a_run_of_20_ascii_digits(data: bytes) -> None:
    assert jsonio.has_long_number(data) == (re.search(rb"[0-9]{20}", data) is not None)


def test_an_integer_beyond_64_bits_stays_an_integer() -> None:
    assert jsonio.loads(b'{"max_tokens": 1000000000000000000000000000000}') == {
        "max_tokens": 10**30}
    assert jsonio.loads(b'{"max_tokens": 1000000000000000000}') == {"max_tokens": 10**18}
    assert jsonio.loads(b'{"s": "12345678901234567890"}') == {"s": "12345678901234567890"}
