"""Money at the edges: decimal strings in, integer nano-USD stored, 9-decimal strings out."""

from __future__ import annotations

from decimal import Decimal, Inexact, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tollway.money import (
    MoneyFormatError,
    format_usd,
    parse_signed_usd,
    parse_usd,
    to_nano_usd,
)


def test_rounding_to_nano_is_exact_for_amounts_of_many_digits() -> None:
    # 20 digits before the point and 41 after: the product with 10^9 has 70 digits, more
    # than a 60-digit context holds; under a context that traps Inexact (as rating's does)
    # it used to raise instead of rounding (found by test_rating_nano's hypothesis search)
    amount = Decimal("10000000000000000000.00000000000811137280173515470033954765175")
    with localcontext() as ctx:
        ctx.traps[Inexact] = True
        assert to_nano_usd(amount) == 10**28  # + 0.0081... nano, rounded half-up: down
        half = Decimal("10000000000000000000.00000000050000000000000000000000000000000")
        assert to_nano_usd(half) == 10**28 + 1  # exactly half a nano: up


def test_format_has_exactly_nine_places() -> None:
    assert format_usd(0) == "0.000000000"
    assert format_usd(1) == "0.000000001"
    assert format_usd(12_500_000_000) == "12.500000000"
    assert format_usd(-1_500_000_001) == "-1.500000001"


def test_parse_is_exact_and_refuses_what_it_cannot_store() -> None:
    assert parse_usd("12.5") == 12_500_000_000
    assert parse_usd(" 0.000000001 ") == 1
    assert parse_usd(3) == 3_000_000_000
    assert parse_usd(Decimal("0.2009")) == 200_900_000
    for bad, message in [("-1", "must not be negative"), ("abc", "is not a number"),
                         ("0.0000000001", "more than 9 decimal places"),
                         ("NaN", "not a finite number"), ("1e30", "too large")]:
        with pytest.raises(MoneyFormatError, match=message):
            parse_usd(bad)
    with pytest.raises(MoneyFormatError, match="decimal string"):
        parse_usd(0.1)  # a float has already lost its exact decimal spelling
    with pytest.raises(MoneyFormatError, match="greater than zero"):
        parse_usd("0", allow_zero=False)


def test_signed_amounts() -> None:
    assert parse_signed_usd("-1.5") == -1_500_000_000
    with pytest.raises(MoneyFormatError):
        parse_signed_usd("0")


def test_rounding_is_half_up() -> None:
    assert to_nano_usd(Decimal("0.0000000005")) == 1
    assert to_nano_usd(Decimal("0.0000000015")) == 2
    assert to_nano_usd(Decimal("0.0000000024999")) == 2


@given(st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1).filter(bool))
def test_format_then_parse_round_trips(nano: int) -> None:
    assert parse_signed_usd(format_usd(nano)) == nano
