"""Rating in integer nano-USD for the request path: the same charge as :func:`rate_tokens` and
:func:`rate_calls`, computed with Python integers only.

The ``Decimal`` functions build every line of the formula under an exact context (the
explanation a usage record or an invoice shows); the gateway needs only the total, for a hold
(tried several times when the hold is lowered to what the balance affords) and for the
settlement. A :class:`TokenRater` turns one (price, ratio) pair into integer coefficients once:

    price_i = P_i · 10^e   (every price brought to the smallest exponent e among them; a tool's
                            price per call counts as 10^6 times that per 1M tokens)
    ratio   = R · 10^r
    exact nano-USD = Σ qty_i · price_i / 10^6 · ratio · 10^9 = (Σ qty_i · P_i · R) · 10^(e+r+3)

so the charge is ``N · 10^E`` when ``E >= 0`` and otherwise ``N / 10^-E`` rounded half-up (ties
away from zero, as ``ROUND_HALF_UP`` does) in integer division: the one rounding, exact for any
size. A per-call price is the same with one term (:func:`call_cost_nano`).
``tests/pricing/test_rating_nano.py`` proves both equal to the ``Decimal`` path over the whole
domain of the formulas (prices with up to 9 decimals, any positive ratio, any token or call
counts, cache prices missing or set, tool fees, and the half-nano ties).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from decimal import Decimal

from tollway.pricing.rating import TokenPrice, TokenUsage

#: a tool's price is per call, the token prices per 1M tokens
_PER_CALL_AS_PER_1M = 6


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
    1-hour cache write and output tokens, and for each priced server-side tool's calls;
    charges are ``Σ qty · coefficient`` scaled by ``10^exponent`` and rounded once."""

    input: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    output: int
    exponent: int
    #: (tool, coefficient per call) for the tools the price names a fee for
    tools: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(cls, price: TokenPrice, ratio: Decimal) -> TokenRater:
        return _rater(price, ratio)

    def cost_nano(self, usage: TokenUsage) -> int:
        """``rate_tokens(usage, price, ratio).cost_nano_usd``."""
        total = (usage.uncached_prompt_tokens * self.input
                 + usage.cached_tokens * self.cache_read
                 + usage.cache_write_tokens * self.cache_write
                 + usage.cache_write_1h_tokens * self.cache_write_1h
                 + usage.completion_tokens * self.output)
        for tool, calls in usage.tool_calls:  # a tool without a fee is not billed
            total += calls * next((c for t, c in self.tools if t == tool), 0)
        return _round(total, self.exponent)

    def worst_case_nano(self, prompt: int, output: int) -> int:
        """The charge of ``prompt`` tokens at the dearest of the input and cache prices plus
        ``output`` tokens (a hold must cover whichever way the upstream bills the prompt)."""
        dearest = max(self.input, self.cache_read, self.cache_write, self.cache_write_1h)
        return _round(prompt * dearest + output * self.output, self.exponent)


def call_cost_nano(calls: int, unit_price: Decimal, ratio: Decimal) -> int:
    """``rate_calls(CallUsage(calls), ..., unit_price=unit_price).cost_nano_usd``:
    ``calls × unit_price × ratio`` in nano-USD, rounded once."""
    coefficient, exponent = _call_rater(unit_price, ratio)
    return _round(calls * coefficient, exponent)


def _round(total: int, exponent: int) -> int:
    """``total · 10^exponent`` rounded half-up (ties away from zero) to an integer."""
    if exponent >= 0:
        return total * _power_of_ten(exponent)
    divisor = _power_of_ten(-exponent)
    if total < 0:
        return -((-total * 2 + divisor) // (divisor * 2))
    return (total * 2 + divisor) // (divisor * 2)


@functools.lru_cache(maxsize=4096)
def _rater(price: TokenPrice, ratio: Decimal) -> TokenRater:
    prices = [_parts(p) for p in (price.input_per_1m, price.effective_cache_read_per_1m,
                                  price.effective_cache_write_per_1m,
                                  price.effective_cache_write_1h_per_1m, price.output_per_1m)]
    tools = [(tool, c, e + _PER_CALL_AS_PER_1M)
             for tool, (c, e) in ((tool, _parts(p)) for tool, p in price.tool_calls)]
    exponent = min([e for _, e in prices] + [e for _, _, e in tools])
    ratio_coefficient, ratio_exponent = _parts(ratio)
    input_, read, write, write_1h, output = (c * _power_of_ten(e - exponent) * ratio_coefficient
                                             for c, e in prices)
    # /10^6 tokens, ×10^9 nano-USD: +3
    return TokenRater(input_, read, write, write_1h, output,
                      exponent=exponent + ratio_exponent + 3,
                      tools=tuple((tool, c * _power_of_ten(e - exponent) * ratio_coefficient)
                                  for tool, c, e in tools))


@functools.lru_cache(maxsize=4096)
def _call_rater(unit_price: Decimal, ratio: Decimal) -> tuple[int, int]:
    """(coefficient, exponent) of one call at ``unit_price`` × ``ratio`` in nano-USD."""
    price_coefficient, price_exponent = _parts(unit_price)
    ratio_coefficient, ratio_exponent = _parts(ratio)
    return price_coefficient * ratio_coefficient, price_exponent + ratio_exponent + 9


@functools.lru_cache(maxsize=256)
def _power_of_ten(n: int) -> int:
    """10^n for n >= 0."""
    return int(10**n)
