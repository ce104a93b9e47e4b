"""Rating in integer nano-USD for the request path: the same charge as :func:`rate_tokens`,
computed with Python integers only.

:func:`rate_tokens` builds ``Decimal`` components under a local context on every call (the
explanation a usage record or an invoice shows). The gateway needs only the total, for a hold
(tried several times when the hold is lowered to what the balance affords) and for the
settlement. A :class:`TokenRater` turns one (price, ratio) pair into integer coefficients once:

    price_i = P_i · 10^e   (every price brought to the smallest exponent e among them)
    ratio   = R · 10^r
    exact nano-USD = Σ qty_i · price_i / 10^6 · ratio · 10^9 = (Σ qty_i · P_i · R) · 10^(e+r+3)

so the charge is ``N · 10^E`` when ``E >= 0`` and otherwise ``N / 10^-E`` rounded half-up (ties
away from zero, as ``ROUND_HALF_UP`` does) in integer division: the one rounding, exact for any
size. ``tests/test_rating_nano.py`` proves it equal to the ``Decimal`` path over the whole
domain of the formula (prices with up to 9 decimals, any positive ratio, any token counts,
cache prices missing or set, and the half-nano ties).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal

from tollway.pricing.rating import TokenPrice, TokenUsage


def _parts(value: Decimal) -> tuple[int, int]:
    """(integer coefficient, exponent) with value == coefficient · 10^exponent."""
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int):
        raise ValueError(f"not a finite price or ratio: {value!r}")
    coefficient = int("".join(map(str, digits)) or "0")
    return (-coefficient if sign else coefficient), exponent


@dataclass(frozen=True, slots=True)
class TokenRater:
    """Integer coefficients (price × ratio, scaled) for input, cache read, cache write,
    1-hour cache write and output tokens; charges are ``Σ qty · coefficient`` scaled by
    ``10^exponent`` and rounded once."""

    input: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    output: int
    exponent: int

    @classmethod
    def of(cls, price: TokenPrice, ratio: Decimal) -> TokenRater:
        return _rater(price, ratio)

    def cost_nano(self, usage: TokenUsage) -> int:
        """``rate_tokens(usage, price, ratio).cost_nano_usd``."""
        return self._scale(usage.uncached_prompt_tokens * self.input
                           + usage.cached_tokens * self.cache_read
                           + usage.cache_write_tokens * self.cache_write
                           + usage.cache_write_1h_tokens * self.cache_write_1h
                           + usage.completion_tokens * self.output)

    def worst_case_nano(self, prompt: int, output: int) -> int:
        """The charge of ``prompt`` tokens at the dearest of the input and cache prices plus
        ``output`` tokens (a hold must cover whichever way the upstream bills the prompt)."""
        dearest = max(self.input, self.cache_read, self.cache_write, self.cache_write_1h)
        return self._scale(prompt * dearest + output * self.output)

    def _scale(self, total: int) -> int:
        if self.exponent >= 0:
            return total * _power_of_ten(self.exponent)
        divisor = _power_of_ten(-self.exponent)
        if total < 0:
            return -((-total * 2 + divisor) // (divisor * 2))
        return (total * 2 + divisor) // (divisor * 2)


@functools.lru_cache(maxsize=4096)
def _rater(price: TokenPrice, ratio: Decimal) -> TokenRater:
    prices = [_parts(p) for p in (price.input_per_1m, price.effective_cache_read_per_1m,
                                  price.effective_cache_write_per_1m,
                                  price.effective_cache_write_1h_per_1m, price.output_per_1m)]
    exponent = min(e for _, e in prices)
    ratio_coefficient, ratio_exponent = _parts(ratio)
    input_, read, write, write_1h, output = (c * _power_of_ten(e - exponent) * ratio_coefficient
                                             for c, e in prices)
    # /10^6 tokens, ×10^9 nano-USD: +3
    return TokenRater(input_, read, write, write_1h, output,
                      exponent=exponent + ratio_exponent + 3)


@functools.lru_cache(maxsize=256)
def _power_of_ten(n: int) -> int:
    """10^n for n >= 0."""
    return int(10**n)
