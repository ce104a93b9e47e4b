"""Rating: the formulas of DESIGN.md, with costs worked out by hand to the nano-dollar."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tollway.pricing.rating import (
    AppliedRatio,
    CallPrice,
    CallUsage,
    InvalidUsage,
    TokenPrice,
    TokenUsage,
    rate_calls,
    rate_tokens,
    resolve_ratio,
)

ONE = AppliedRatio(Decimal(1), "group")
D = Decimal


def test_openai_usage_with_cached_tokens() -> None:
    # 800 uncached × $0.15 + 200 cached × $0.075 + 500 out × $0.60, per 1M tokens
    # = (120 + 15 + 300) / 1e6 = $0.000435 = 435 000 nano-USD
    price = TokenPrice(D("0.15"), D("0.60"), cache_read_per_1m=D("0.075"))
    charge = rate_tokens(TokenUsage(prompt_tokens=1000, completion_tokens=500, cached_tokens=200),
                         price, ONE)
    assert charge.cost_nano_usd == 435_000
    assert [(c.name, c.quantity, c.amount_usd) for c in charge.components] == [
        ("input", 800, D("0.00012")), ("cache_read", 200, D("0.000015")),
        ("cache_write", 0, D("0")), ("cache_write_1h", 0, D("0")), ("output", 500, D("0.0003"))]


def test_price_of_0_2009_with_model_override_rounds_once_half_up() -> None:
    # 1234 × 0.2009 = 247.9106; 567 × 0.8036 = 455.6412; sum 703.5518 per 1M
    # → $0.0007035518 × 0.7 (vip override) = $0.00049248626 = 492 486.26 nano → 492 486
    price = TokenPrice(D("0.2009"), D("0.8036"))
    ratio = resolve_ratio("vip", {"default": D(1), "vip": D("0.8")}, {"vip": D("0.7")})
    assert ratio == AppliedRatio(D("0.7"), "model")
    charge = rate_tokens(TokenUsage(1234, 567), price, ratio)
    assert charge.subtotal_usd == D("0.0007035518")
    assert charge.exact_usd == D("0.00049248626")
    assert charge.cost_nano_usd == 492_486


def test_group_ratio_applies_without_override() -> None:
    ratio = resolve_ratio("vip", {"default": D(1), "vip": D("0.8")}, {"other": D("0.5")})
    assert ratio == AppliedRatio(D("0.8"), "group")


def test_half_a_nano_rounds_up_not_to_even() -> None:
    price = TokenPrice(D("0.0005"), D("0"))  # $0.0005 / 1M tokens = 0.5 nano per token
    assert rate_tokens(TokenUsage(1, 0), price, ONE).cost_nano_usd == 1  # 0.5 nano → 1
    assert rate_tokens(TokenUsage(5, 0), price, ONE).cost_nano_usd == 3  # 2.5 nano → 3
    assert rate_tokens(TokenUsage(3, 0), price, ONE).cost_nano_usd == 2  # 1.5 nano → 2


def test_cache_reads_and_writes_priced_separately() -> None:
    # prompt 10 000 = 4 000 uncached + 4 000 cached + 2 000 cache-write; 1 500 output
    # 4000×2.5 + 4000×1.25 + 2000×3.125 + 1500×10 = 10000+5000+6250+15000 = 36 250 per 1M
    # = $0.03625 × 0.8 = $0.029 = 29 000 000 nano-USD
    price = TokenPrice(D("2.50"), D("10.00"), D("1.25"), D("3.125"))
    usage = TokenUsage(prompt_tokens=10_000, completion_tokens=1_500, cached_tokens=4_000,
                       cache_write_tokens=2_000)
    assert rate_tokens(usage, price, AppliedRatio(D("0.8"), "group")).cost_nano_usd == 29_000_000


def test_missing_cache_prices_fall_back_to_input_price() -> None:
    # 100 cached + 50 cache-write tokens at the input price $1/1M, 0 output: $0.00015
    price = TokenPrice(D("1"), D("2"))
    usage = TokenUsage(prompt_tokens=150, completion_tokens=0, cached_tokens=100,
                       cache_write_tokens=50)
    assert rate_tokens(usage, price, ONE).cost_nano_usd == 150_000


def test_anthropic_usage_is_converted_to_openai_semantics() -> None:
    usage = TokenUsage.from_anthropic(input_tokens=100, output_tokens=20,
                                      cache_read_input_tokens=1000,
                                      cache_creation_input_tokens=50)
    assert usage == TokenUsage(prompt_tokens=1150, completion_tokens=20, cached_tokens=1000,
                               cache_write_tokens=50)
    assert usage.uncached_prompt_tokens == 100  # never negative (new-api #5003)


def test_one_hour_cache_writes_priced_apart_from_five_minute_ones() -> None:
    # Anthropic-style prices: input 3, output 15, cache read 0.30, 5m write 3.75, 1h write 6.
    # prompt 10 000 = 1 000 uncached + 6 000 read + 2 000 5m-writes + 1 000 1h-writes; 400 out
    # 1000×3 + 6000×0.3 + 2000×3.75 + 1000×6 + 400×15 = 3000+1800+7500+6000+6000 = 24 300
    # per 1M = $0.0243 × 0.9 = $0.02187 = 21 870 000 nano-USD
    price = TokenPrice(D("3"), D("15"), D("0.30"), D("3.75"), D("6"))
    usage = TokenUsage(prompt_tokens=10_000, completion_tokens=400, cached_tokens=6_000,
                       cache_write_tokens=2_000, cache_write_1h_tokens=1_000)
    charge = rate_tokens(usage, price, AppliedRatio(D("0.9"), "group"))
    assert charge.cost_nano_usd == 21_870_000
    assert [(c.name, c.quantity, c.unit_price_usd) for c in charge.components] == [
        ("input", 1000, D("3")), ("cache_read", 6000, D("0.30")),
        ("cache_write", 2000, D("3.75")), ("cache_write_1h", 1000, D("6")),
        ("output", 400, D("15"))]


def test_missing_one_hour_write_price_falls_back_to_write_then_input() -> None:
    usage = TokenUsage(prompt_tokens=1000, completion_tokens=0, cache_write_1h_tokens=1000)
    # no 1h price: the 5m write price 3.75 → 1000 × 3.75 / 1e6 = $0.00375
    assert rate_tokens(usage, TokenPrice(D("3"), D("15"), None, D("3.75")),
                       ONE).cost_nano_usd == 3_750_000
    # no cache-write price at all: the input price 3 → $0.003
    assert rate_tokens(usage, TokenPrice(D("3"), D("15")), ONE).cost_nano_usd == 3_000_000


def test_anthropic_cache_creation_split_into_5m_and_1h_writes() -> None:
    # Anthropic: input_tokens (50) EXCLUDES the 300 read and 700 created tokens.
    usage = TokenUsage.from_anthropic(
        input_tokens=50, output_tokens=9, cache_read_input_tokens=300,
        cache_creation_input_tokens=700, ephemeral_5m_input_tokens=200,
        ephemeral_1h_input_tokens=500)
    assert usage == TokenUsage(prompt_tokens=1050, completion_tokens=9, cached_tokens=300,
                               cache_write_tokens=200, cache_write_1h_tokens=500)
    # without the split every creation token is a 5-minute write
    assert TokenUsage.from_anthropic(input_tokens=50, output_tokens=9,
                                     cache_creation_input_tokens=700).cache_write_tokens == 700


def test_responses_usage_already_includes_cached_and_reasoning_tokens() -> None:
    usage = TokenUsage.from_responses(input_tokens=2000, output_tokens=300, cached_tokens=1500)
    assert usage == TokenUsage(prompt_tokens=2000, completion_tokens=300, cached_tokens=1500)
    with pytest.raises(InvalidUsage):  # more cached than input cannot be real
        TokenUsage.from_responses(input_tokens=10, output_tokens=0, cached_tokens=11)


def test_per_call_price_times_ratio() -> None:
    assert rate_calls(CallUsage(), CallPrice(D("0.002")),
                      AppliedRatio(D("0.8"), "group")).cost_nano_usd == 1_600_000
    # 3 × $0.000000333 × 0.5 = $0.0000004995 = 499.5 nano → 500
    assert rate_calls(CallUsage(3), CallPrice(D("0.000000333")),
                      AppliedRatio(D("0.5"), "group")).cost_nano_usd == 500


@pytest.mark.parametrize("kwargs", [
    {"prompt_tokens": -1, "completion_tokens": 0},
    {"prompt_tokens": 10, "completion_tokens": 0, "cached_tokens": 11},
    {"prompt_tokens": 10, "completion_tokens": 0, "cached_tokens": 6, "cache_write_tokens": 5},
    {"prompt_tokens": 10, "completion_tokens": 0, "cache_write_tokens": 6,
     "cache_write_1h_tokens": 5},
    {"prompt_tokens": 1.5, "completion_tokens": 0},
])
def test_impossible_usage_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidUsage):
        TokenUsage(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

prices = st.decimals(min_value=0, max_value=1000, places=9, allow_nan=False,
                     allow_infinity=False)
ratios = st.decimals(min_value=D("0.000001"), max_value=10, places=6, allow_nan=False,
                     allow_infinity=False)
counts = st.integers(min_value=0, max_value=10**9)


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


def _oracle_nano(usage: TokenUsage, price: TokenPrice, ratio: D) -> int:
    """The formula in exact rational arithmetic, rounded half-up: an independent check."""
    read = price.input_per_1m if price.cache_read_per_1m is None else price.cache_read_per_1m
    write = price.input_per_1m if price.cache_write_per_1m is None else price.cache_write_per_1m
    write_1h = write if price.cache_write_1h_per_1m is None else price.cache_write_1h_per_1m
    total = (Fraction(usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens
                      - usage.cache_write_1h_tokens)
             * Fraction(price.input_per_1m) + usage.cached_tokens * Fraction(read)
             + usage.cache_write_tokens * Fraction(write)
             + usage.cache_write_1h_tokens * Fraction(write_1h)
             + usage.completion_tokens * Fraction(price.output_per_1m))
    nano = total / 10**6 * Fraction(ratio) * 10**9
    return int((nano + Fraction(1, 2)).__floor__())


@settings(max_examples=400, deadline=None)
@given(usages(), token_prices(), ratios)
def test_token_cost_matches_exact_rational_formula(usage: TokenUsage, price: TokenPrice,
                                                   ratio: D) -> None:
    charge = rate_tokens(usage, price, AppliedRatio(ratio, "group"))
    assert charge.cost_nano_usd == _oracle_nano(usage, price, ratio)


@settings(max_examples=300, deadline=None)
@given(usages(), token_prices(), ratios)
def test_components_add_up_and_ratio_scales_before_rounding(usage: TokenUsage,
                                                            price: TokenPrice, ratio: D) -> None:
    charge = rate_tokens(usage, price, AppliedRatio(ratio, "group"))
    assert charge.subtotal_usd == sum(c.amount_usd for c in charge.components)
    assert charge.exact_usd == charge.subtotal_usd * ratio  # exact: nothing rounded yet
    unit = rate_tokens(usage, price, ONE)
    assert unit.subtotal_usd == charge.subtotal_usd
    assert sum(c.quantity for c in charge.components) == usage.prompt_tokens + \
        usage.completion_tokens


@settings(max_examples=200, deadline=None)
@given(token_prices(), ratios)
def test_zero_usage_costs_zero(price: TokenPrice, ratio: D) -> None:
    assert rate_tokens(TokenUsage(0, 0), price, AppliedRatio(ratio, "group")).cost_nano_usd == 0
    assert rate_calls(CallUsage(0), CallPrice(price.input_per_1m),
                      AppliedRatio(ratio, "group")).cost_nano_usd == 0


@settings(max_examples=200, deadline=None)
@given(usages(), prices, prices, ratios)
def test_missing_cache_price_equals_input_price(usage: TokenUsage, input_price: D, output: D,
                                                ratio: D) -> None:
    applied = AppliedRatio(ratio, "group")
    implicit = rate_tokens(usage, TokenPrice(input_price, output), applied)
    explicit = rate_tokens(usage, TokenPrice(input_price, output, input_price, input_price,
                                             input_price), applied)
    assert implicit.cost_nano_usd == explicit.cost_nano_usd


@settings(max_examples=200, deadline=None)
@given(usages(), token_prices(), ratios, st.integers(0, 10**6))
def test_more_output_never_costs_less(usage: TokenUsage, price: TokenPrice, ratio: D,
                                      extra: int) -> None:
    applied = AppliedRatio(ratio, "group")
    more = TokenUsage(usage.prompt_tokens, usage.completion_tokens + extra, usage.cached_tokens,
                      usage.cache_write_tokens, usage.cache_write_1h_tokens)
    assert rate_tokens(more, price, applied).cost_nano_usd >= \
        rate_tokens(usage, price, applied).cost_nano_usd


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**6), prices, ratios)
def test_per_call_cost_is_calls_times_price_times_ratio(calls: int, price: D, ratio: D) -> None:
    cost = rate_calls(CallUsage(calls), CallPrice(price), AppliedRatio(ratio, "group"))
    exact = Fraction(calls) * Fraction(price) * Fraction(ratio) * 10**9
    assert cost.cost_nano_usd == int((exact + Fraction(1, 2)).__floor__())


# --------------------------------------------------------------------------- converters

small = st.integers(min_value=0, max_value=10**7)


@st.composite
def anthropic_usages(draw: st.DrawFn) -> dict[str, int | None]:
    """An Anthropic usage object's numbers, with or without the 5m/1h creation split."""
    creation = draw(small)
    split = draw(st.booleans())
    one_hour = draw(st.integers(0, creation)) if split else None
    return {"input_tokens": draw(small), "output_tokens": draw(small),
            "cache_read_input_tokens": draw(small), "cache_creation_input_tokens": creation,
            "ephemeral_1h_input_tokens": one_hour,
            "ephemeral_5m_input_tokens": None if one_hour is None else creation - one_hour}


@settings(max_examples=300, deadline=None)
@given(anthropic_usages())
def test_anthropic_converted_totals_equal_the_protocols_totals(raw: dict[str, int | None]
                                                              ) -> None:
    usage = TokenUsage.from_anthropic(**raw)  # type: ignore[arg-type]
    # Anthropic's total input = input + cache reads + cache creation; the converted prompt
    # is exactly that, and every kind keeps its own count.
    assert usage.prompt_tokens == (raw["input_tokens"] or 0) + (
        raw["cache_read_input_tokens"] or 0) + (raw["cache_creation_input_tokens"] or 0)
    assert usage.uncached_prompt_tokens == raw["input_tokens"]  # never negative
    assert usage.cached_tokens == raw["cache_read_input_tokens"]
    assert usage.cache_writes == raw["cache_creation_input_tokens"]
    assert usage.cache_write_1h_tokens == (raw["ephemeral_1h_input_tokens"] or 0)
    assert usage.completion_tokens == raw["output_tokens"]


@settings(max_examples=300, deadline=None)
@given(small, small, st.data())
def test_responses_converted_totals_equal_the_protocols_totals(input_tokens: int,
                                                               output_tokens: int,
                                                               data: st.DataObject) -> None:
    cached = data.draw(st.integers(0, input_tokens))
    usage = TokenUsage.from_responses(input_tokens=input_tokens, output_tokens=output_tokens,
                                      cached_tokens=cached)
    assert (usage.prompt_tokens, usage.completion_tokens) == (input_tokens, output_tokens)
    assert usage.uncached_prompt_tokens == input_tokens - cached >= 0


@settings(max_examples=200, deadline=None)
@given(anthropic_usages(), token_prices(), ratios, small)
def test_anthropic_cost_is_monotone_in_every_token_kind(raw: dict[str, int | None],
                                                        price: TokenPrice, ratio: D,
                                                        extra: int) -> None:
    applied = AppliedRatio(ratio, "group")
    base = rate_tokens(TokenUsage.from_anthropic(**raw), price,  # type: ignore[arg-type]
                       applied).cost_nano_usd
    assert base >= 0
    for name in ("input_tokens", "output_tokens", "cache_read_input_tokens"):
        more = {**raw, name: (raw[name] or 0) + extra}
        assert rate_tokens(TokenUsage.from_anthropic(**more), price,  # type: ignore[arg-type]
                           applied).cost_nano_usd >= base


def test_anthropic_converter_refuses_negative_counts() -> None:
    with pytest.raises(InvalidUsage):
        TokenUsage.from_anthropic(input_tokens=-1, output_tokens=0)
    with pytest.raises(InvalidUsage):
        TokenUsage.from_anthropic(input_tokens=1, output_tokens=0,
                                  cache_creation_input_tokens=5, ephemeral_1h_input_tokens=-2)


@settings(max_examples=300, deadline=None)
@given(prompt=st.integers(0, 10**7), completion=st.integers(0, 10**6),
       searches=st.integers(0, 1000), fetches=st.integers(0, 1000),
       fee_nano=st.integers(0, 10**9), ratio_milli=st.integers(1, 5000))
def test_tool_fees_are_calls_times_price_added_before_the_ratio_rounded_once(
        prompt: int, completion: int, searches: int, fetches: int, fee_nano: int,
        ratio_milli: int) -> None:
    """Server-side tool calls: exactly calls × price per call, for the tools the price names
    (``web_fetch`` here has none: not billed), in the one sum × ratio, rounded once."""
    fee = Decimal(fee_nano).scaleb(-9)
    price = TokenPrice(Decimal("3"), Decimal("15"), tool_calls=(("web_search", fee),))
    ratio = AppliedRatio(Decimal(ratio_milli).scaleb(-3), "group")
    usage = TokenUsage(prompt, completion).with_tools({"web_search": searches,
                                                       "web_fetch": fetches})
    charge = rate_tokens(usage, price, ratio)
    exact = (Fraction(prompt * 3 + completion * 15, 10**6) + searches * Fraction(fee_nano, 10**9)
             ) * Fraction(ratio_milli, 1000)
    assert Fraction(charge.exact_usd) == exact
    nano = exact * 10**9
    assert charge.cost_nano_usd == int(nano) + (1 if nano - int(nano) >= Fraction(1, 2) else 0)
    tools = [c for c in charge.components if c.name.startswith("tool:")]
    assert [(c.name, c.quantity, c.unit_price_usd) for c in tools] == [
        ("tool:web_search", searches, fee)]
