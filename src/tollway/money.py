"""Money: decimal strings at the edges, ``Decimal`` in code, integer nano-USD in storage.

One nano-dollar (1e-9 USD) is the ledger unit. Every conversion from an exact ``Decimal``
amount to the ledger unit goes through :func:`to_nano_usd`, which rounds half-up exactly
once; nothing on the money path ever touches a binary float.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation, localcontext

NANO_PER_USD = 1_000_000_000
NANO = Decimal("0.000000001")
#: Largest amount a signed 64-bit nano-USD column holds (about 9.2 billion USD).
MAX_NANO_USD = 2**63 - 1


class MoneyFormatError(ValueError):
    """A money value given by a person or a file is not an exact, non-negative decimal."""


def to_nano_usd(amount_usd: Decimal) -> int:
    """Round an exact USD amount half-up to whole nano-dollars (the one rounding).

    The product with 10^9 is exact at any size: the precision covers the amount's digits and
    the ten of 10^9 (a caller's context may trap ``Inexact``)."""
    with localcontext() as ctx:
        ctx.prec = max(60, len(amount_usd.as_tuple().digits) + 10)
        return int((amount_usd * NANO_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def nano_to_decimal(nano_usd: int) -> Decimal:
    """The exact USD value of an integer nano-USD amount."""
    return Decimal(nano_usd).scaleb(-9)


def format_usd(nano_usd: int) -> str:
    """Render nano-USD as the API's decimal string with exactly 9 decimal places."""
    sign = "-" if nano_usd < 0 else ""
    whole, frac = divmod(abs(nano_usd), NANO_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def parse_decimal(value: object, *, what: str = "amount") -> Decimal:
    """Read a decimal written as a string or an int (or a Decimal) exactly.

    Floats are refused: by the time a value is a float its exact decimal spelling is lost.
    """
    if isinstance(value, bool) or isinstance(value, float):
        raise MoneyFormatError(f"{what} must be written as a decimal string, got {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            result = Decimal(text)
        except InvalidOperation:
            raise MoneyFormatError(f"{what} {value!r} is not a number") from None
    else:
        raise MoneyFormatError(f"{what} must be a decimal number, got {type(value).__name__}")
    if not result.is_finite():
        raise MoneyFormatError(f"{what} {value!r} is not a finite number")
    return result


def parse_usd(value: object, *, what: str = "amount", allow_zero: bool = True) -> int:
    """Parse a non-negative USD amount given by a person into exact nano-USD.

    Amounts with more than 9 decimal places are refused rather than rounded: an operator
    typing a price or a top-up means exactly what they typed.
    """
    amount = parse_decimal(value, what=what)
    if amount < 0:
        raise MoneyFormatError(f"{what} must not be negative, got {value!r}")
    if amount == 0 and not allow_zero:
        raise MoneyFormatError(f"{what} must be greater than zero")
    nano = amount * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise MoneyFormatError(f"{what} {value!r} has more than 9 decimal places")
    if nano > MAX_NANO_USD:
        raise MoneyFormatError(f"{what} {value!r} is too large")
    return int(nano)


def parse_signed_usd(value: object, *, what: str = "amount") -> int:
    """Parse a signed, non-zero USD amount (operator adjustments) into exact nano-USD."""
    amount = parse_decimal(value, what=what)
    magnitude = parse_usd(abs(amount), what=what, allow_zero=False)
    return -magnitude if amount < 0 else magnitude
