"""The request path's integer rating (``pricing/nano.py``, behind ``metering.rate``) charges
exactly what the ``Decimal`` path (``rate_tokens``, ``rate_calls``) charges, over the whole
domain of the formulas: prices with up to 9 decimals (the catalog refuses more), missing or set
cache prices, server-side tool fees (priced or not), any positive ratio (the catalog accepts any
decimal above 0), token and call counts from 0 to far past any real request, and the half-nano
ties that ROUND_HALF_UP rounds up; and the charge ``metering.rate`` returns explains itself
with the ``Decimal`` formula's own lines."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tollway.billing import metering
from tollway.money import MAX_NANO_USD, to_nano_usd
from tollway.pricing.nano import TokenRater, call_cost_nano
from tollway.pricing.rating import (
    AppliedRatio,
    CallPrice,
    CallUsage,
    TokenPrice,
    TokenUsage,
    rate_calls,
    rate_tokens,
)

D = Decimal

prices = st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False,
                     allow_infinity=False)
#: ratios as the catalog may hold them: few or many digits, tiny or large, 1E+3 spellings too
ratios = st.one_of(
    st.decimals(min_value=D("0.000001"), max_value=10, places=6, allow_nan=False,
                allow_infinity=False),
    st.decimals(min_value=D("1E-12"), max_value=D("1E+6"), allow_nan=False,
                allow_infinity=False).filter(lambda r: r > 0 and len(r.as_tuple().digits) <= 20),
    st.builds(lambda c, e: D(c).scaleb(e), st.integers(1, 10**6), st.integers(-9, 6)),
)
counts = st.integers(min_value=0, max_value=10**12)
tools = st.sampled_from(["web_search", "web_fetch", "code_execution"])


@st.composite
def usages(draw: st.DrawFn) -> TokenUsage:
    prompt = draw(counts)
    cached = draw(st.integers(0, prompt))
    write = draw(st.integers(0, prompt - cached))
    write_1h = draw(st.integers(0, prompt - cached - write))
    return TokenUsage(prompt, draw(counts), cached, write, write_1h)


@st.composite
def token_prices(draw: st.DrawFn) -> TokenPrice:
    return TokenPrice(draw(prices), draw(prices), draw(st.none() | prices),
                      draw(st.none() | prices), draw(st.none() | prices))


@st.composite
def usages_with_tools(draw: st.DrawFn) -> TokenUsage:
    """Usage that may report server-side tool calls (some of them a price names no fee for)."""
    return draw(usages()).with_tools(draw(st.dictionaries(tools, counts, max_size=3)))


@st.composite
def prices_with_tools(draw: st.DrawFn) -> TokenPrice:
    """Token prices that may name fees per call for some tools (USD per call, 9 decimals)."""
    price = draw(token_prices())
    fees = draw(st.dictionaries(tools, prices, max_size=3))
    return TokenPrice(price.input_per_1m, price.output_per_1m, price.cache_read_per_1m,
                      price.cache_write_per_1m, price.cache_write_1h_per_1m,
                      tuple(sorted(fees.items())))


def _decimal_cost(usage: TokenUsage, price: TokenPrice, ratio: D) -> int:
    return rate_tokens(usage, price, AppliedRatio(ratio, "group")).cost_nano_usd


@settings(max_examples=800, deadline=None)
@given(usages(), token_prices(), ratios)
@example(TokenUsage(1, 0), TokenPrice(D("0.0005"), D(0)), D(1))  # 0.5 nano -> 1
@example(TokenUsage(3, 0), TokenPrice(D("0.0005"), D(0)), D(1))  # 1.5 nano -> 2
@example(TokenUsage(0, 1), TokenPrice(D(0), D("0.000499999")), D(1))  # 0.499999 -> 0
@example(TokenUsage(1, 1, 1), TokenPrice(D(1), D("0.000000001"), D("0.0001")), D("5"))
@example(TokenUsage(10, 0), TokenPrice(D("0.2009"), D(0)), D("0.25"))  # 0.50225 -> 1
@example(TokenUsage(10**12, 10**12, 10**11, 10**11, 10**11),
         TokenPrice(D("1000000"), D("999999.999999999")), D("1E+6"))
def test_integer_rating_equals_the_decimal_path(usage: TokenUsage, price: TokenPrice,
                                                ratio: D) -> None:
    assert TokenRater.of(price, ratio).cost_nano(usage) == _decimal_cost(usage, price, ratio)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**12), st.integers(0, 10**30), token_prices(), ratios)
def test_hold_at_the_dearest_prompt_price_equals_the_decimal_path(
        prompt: int, output: int, price: TokenPrice, ratio: D) -> None:
    """What ``LLMCall.hold_cost`` computes: the prompt at the dearest of input and cache
    prices; absurd output bounds (``max_tokens: 10**30``) end at the ledger's ceiling."""
    worst = TokenPrice(max(price.input_per_1m, price.effective_cache_read_per_1m,
                           price.effective_cache_write_per_1m,
                           price.effective_cache_write_1h_per_1m), price.output_per_1m)
    expected = _decimal_cost(TokenUsage(prompt, output), worst, ratio)
    held = TokenRater.of(price, ratio).worst_case_nano(prompt, output)
    assert min(held, MAX_NANO_USD) == min(expected, MAX_NANO_USD)
    if expected < MAX_NANO_USD:
        assert held == expected


@pytest.mark.parametrize(("usage", "price", "ratio", "nano"), [
    # 800 × 0.15 + 200 × 0.075 + 500 × 0.60 per 1M = 435 000 nano (tests/test_rating.py)
    (TokenUsage(1000, 500, 200), TokenPrice(D("0.15"), D("0.60"), D("0.075")), D(1), 435_000),
    # 1 token at $0.0005 / 1M = 0.5 nano: half-up to 1; at ratio 0.999999 just below: 0
    (TokenUsage(1, 0), TokenPrice(D("0.0005"), D(0)), D(1), 1),
    (TokenUsage(1, 0), TokenPrice(D("0.0005"), D(0)), D("0.999999"), 0),
    # a ratio written 1E+3: 1 output token at $0.000001 / 1M × 1000 = 1 nano
    (TokenUsage(0, 1), TokenPrice(D(0), D("0.000001")), D("1E+3"), 1),
    # cache writes fall back to the input price, 1-hour writes to the 5-minute price
    (TokenUsage(3, 0, 0, 1, 1), TokenPrice(D(2), D(0), None, D(4)), D(1), 2_000 + 4_000 + 4_000),
])
def test_hand_computed_charges(usage: TokenUsage, price: TokenPrice, ratio: D,
                               nano: int) -> None:
    assert TokenRater.of(price, ratio).cost_nano(usage) == nano
    assert _decimal_cost(usage, price, ratio) == nano


def test_a_rater_is_built_once_per_price_and_ratio() -> None:
    price = TokenPrice(D("0.15"), D("0.60"))
    assert TokenRater.of(price, D("0.8")) is TokenRater.of(TokenPrice(D("0.15"), D("0.60")),
                                                           D("0.8"))


@settings(max_examples=800, deadline=None)
@given(usages_with_tools(), prices_with_tools(), ratios)
@example(TokenUsage(1, 0), TokenPrice(D("0.0005"), D(0)), D(1))  # 0.5 nano -> 1
@example(TokenUsage(0, 0, tool_calls=(("web_search", 1),)),
         TokenPrice(D(0), D(0), tool_calls=(("web_search", D("0.0000000005")),)), D(1))
@example(TokenUsage(1, 0, tool_calls=(("web_search", 1),)),  # 0.5 + 0.5 nano: 1, not 2
         TokenPrice(D("0.0005"), D(0), tool_calls=(("web_search", D("0.0000000005")),)), D(1))
@example(TokenUsage(10**12, 10**12, 10**11, 10**11, 10**11, (("web_search", 10**12),)),
         TokenPrice(D("1000000"), D("999999.999999999"),
                    tool_calls=(("web_search", D("999999.999999999")),)), D("1E+6"))
def test_the_charge_metering_rate_computes_is_the_decimal_formulas(
        usage: TokenUsage, price: TokenPrice, ratio: D) -> None:
    """``metering.rate``, the one function that computes a charge, costs in integers what the
    exact formula costs, tool fees included; its lines, subtotal and exact amount are the
    formula's, and the cost is that exact amount rounded once."""
    applied = AppliedRatio(ratio, "model")
    charge = metering.rate(usage, price, applied)
    expected = rate_tokens(usage, price, applied)
    assert charge.cost_nano_usd == expected.cost_nano_usd
    assert charge.components == expected.components
    assert charge.exact_usd == expected.exact_usd
    assert Fraction(charge.exact_usd) == Fraction(charge.subtotal_usd) * Fraction(ratio)
    assert charge.cost_nano_usd == to_nano_usd(charge.exact_usd)
    assert charge.ratio == applied


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 10**12), prices, st.none() | prices, ratios)
@example(1, D("0.0000000005"), None, D(1))  # 0.5 nano -> 1
@example(3, D("0.0000000005"), None, D(1))  # 1.5 nano -> 2
@example(1, D("0.002"), D("0.0000000004999"), D("1"))  # an image size's price: 0.4999 -> 0
@example(10**12, D("999999.999999999"), None, D("1E+6"))
def test_a_per_call_charge_is_the_decimal_formulas(calls: int, per_call: D,
                                                   unit_price: D | None, ratio: D) -> None:
    """Per-call routes and image models (``unit_price``: a size's or quality's price)."""
    applied = AppliedRatio(ratio, "group")
    price = CallPrice(per_call)
    charge = metering.rate(CallUsage(calls), price, applied, unit_price=unit_price)
    expected = rate_calls(CallUsage(calls), price, applied, unit_price=unit_price)
    assert charge.cost_nano_usd == expected.cost_nano_usd
    assert charge.cost_nano_usd == call_cost_nano(
        calls, per_call if unit_price is None else unit_price, ratio)
    assert charge.components == expected.components
    assert charge.exact_usd == expected.exact_usd
    assert charge.cost_nano_usd == to_nano_usd(charge.exact_usd)


def test_a_tool_the_price_names_no_fee_for_is_not_billed() -> None:
    price = TokenPrice(D(3), D(15), tool_calls=(("web_search", D("0.01")),))
    usage = TokenUsage(1000, 100).with_tools({"web_search": 2, "web_fetch": 5})
    # 1000 × 3 + 100 × 15 per 1M = 4 500 000 nano; 2 searches × $0.01 = 20 000 000 nano
    assert TokenRater.of(price, D(1)).cost_nano(usage) == 24_500_000
    assert [c.name for c in metering.rate(usage, price, AppliedRatio(D(1), "group")).components
            ] == ["input", "cache_read", "cache_write", "cache_write_1h", "output",
                  "tool:web_search"]
