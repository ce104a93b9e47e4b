"""Hypothesis over the ``usage`` an upstream reports, in answers and in stream chunks.

Whatever the upstream says (missing fields, strings, floats, booleans, negatives, 10^20,
more cached than prompt tokens, usage in any chunk or in none), each request ends with exactly
one usage record, its cost is the formula applied to the record's own figures, the balance
moved by exactly that cost, no hold stays open, and the figures are either the upstream's
(``usage_source`` upstream), capped at the request's bounds (``capped``, with a note) or a
local count (``estimated``, with a note). Usage that is plausible is billed exactly as
reported; plausible-looking usage beyond the bounds is capped.

Prices: ``gpt-test`` input 0.15, output 0.60, cache read 0.075 per 1M tokens. Requests send
``HELLO`` (local count 8, hold estimate 10) with ``max_tokens`` 50: the bounds are a prompt of
max(10 × 4, 10 + 4096) = 4106 tokens and 50 output tokens.

``make test`` runs a few derandomized examples; ``make stress`` (marker ``stress``) runs
``TOLLWAY_STRESS_EXAMPLES`` (default 300) random ones.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_upstream import DONE, PIECES, answer, chunk, delta, replying, streaming

from fakes import (
    IGNORE_TOKENIZER_WARNING,
    USD,
    Tollway,
)
from tollway.gateway.usage import (
    bounded,
    parse_anthropic_usage,
    parse_openai_usage,
    parse_responses_usage,
)
from tollway.pricing.rating import AppliedRatio, InvalidUsage, TokenPrice, TokenUsage, rate_tokens

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

LONG_EXAMPLES = int(os.environ.get("TOLLWAY_STRESS_EXAMPLES", "300"))
GPT = TokenPrice(Decimal("0.15"), Decimal("0.60"), Decimal("0.075"))
ONE = AppliedRatio(Decimal(1), "group")
PROMPT_BOUND, OUTPUT_BOUND = 128_000, 50  # gpt-test's context_window, max_tokens
HELLO = [{"role": "user", "content": "hello there"}]

counts = st.one_of(st.integers(0, 5000), st.integers(-10**6, 10**20),
                   st.sampled_from([None, "20", 20.0, True, [], {}, 10**18, 2**63]))
details = st.one_of(st.none(), st.just("x"), st.fixed_dictionaries({}, optional={
    "cached_tokens": counts, "cache_write_tokens": counts, "reasoning_tokens": counts}))
usages = st.one_of(
    st.fixed_dictionaries({}, optional={
        "prompt_tokens": counts, "completion_tokens": counts, "total_tokens": counts,
        "prompt_tokens_details": details, "completion_tokens_details": details}),
    st.sampled_from([None, "lots", 7, [], {"prompt_tokens": 20}]))
plausible = st.builds(
    lambda p, c, cached, r: {"prompt_tokens": p, "completion_tokens": c,
                             "prompt_tokens_details": {"cached_tokens": min(cached, p)},
                             "completion_tokens_details": {"reasoning_tokens": min(r, c)}},
    st.integers(0, PROMPT_BOUND), st.integers(0, OUTPUT_BOUND), st.integers(0, 5000),
    st.integers(0, 5000))


#: Anthropic's usage (message_start + message_delta merged, or a whole message's).
anthropic_usages = st.one_of(
    st.fixed_dictionaries({}, optional={
        "input_tokens": counts, "output_tokens": counts, "cache_read_input_tokens": counts,
        "cache_creation_input_tokens": counts,
        "cache_creation": st.one_of(st.none(), st.just("x"), st.fixed_dictionaries({}, optional={
            "ephemeral_5m_input_tokens": counts, "ephemeral_1h_input_tokens": counts}))}),
    st.sampled_from([None, "lots", 7, [], {"input_tokens": 20}]))
#: The Responses API's usage (a whole answer's, or response.completed's).
responses_usages = st.one_of(
    st.fixed_dictionaries({}, optional={
        "input_tokens": counts, "output_tokens": counts, "total_tokens": counts,
        "input_tokens_details": st.one_of(st.none(), st.just("x"), st.fixed_dictionaries(
            {}, optional={"cached_tokens": counts})),
        "output_tokens_details": st.one_of(st.none(), st.just("x"), st.fixed_dictionaries(
            {}, optional={"reasoning_tokens": counts}))}),
    st.sampled_from([None, "lots", 7, [], {"input_tokens": 20}]))


def cost(usage: TokenUsage) -> int:
    return rate_tokens(usage, GPT, ONE).cost_nano_usd


# --------------------------------------------------------------------------- the parser alone


def fuzz(strategy: st.SearchStrategy[Any], check: Callable[..., None], *, examples: int,
         long: bool) -> None:
    """``check(**example)`` on ``examples`` derandomized examples (``make test``), or on
    ``TOLLWAY_STRESS_EXAMPLES`` random ones (``make stress``)."""
    @settings(max_examples=LONG_EXAMPLES if long else examples, derandomize=not long,
              deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(value=strategy)
    def run(value: dict[str, Any]) -> None:
        check(**value)

    run()


FAST_OR_LONG = pytest.mark.parametrize(
    "long", [False, pytest.param(True, marks=pytest.mark.stress)], ids=["fast", "long"])


def check_parsing(raw: Any, protocol: str = "openai") -> None:
    try:
        if protocol == "anthropic":
            usage, reasoning = parse_anthropic_usage(raw), 0
        elif protocol == "responses":
            usage, reasoning = parse_responses_usage(raw)
        else:
            usage, reasoning = parse_openai_usage(raw)
    except InvalidUsage:
        return
    metered = bounded(usage, reasoning, prompt_bound=PROMPT_BOUND,
                      completion_bound=OUTPUT_BOUND)
    billed = metered.usage
    assert billed.prompt_tokens <= PROMPT_BOUND and billed.completion_tokens <= OUTPUT_BOUND
    assert 0 <= billed.cached_tokens + billed.cache_write_tokens + billed.cache_write_1h_tokens
    assert (billed.cached_tokens + billed.cache_write_tokens + billed.cache_write_1h_tokens
            <= billed.prompt_tokens)
    assert 0 <= metered.reasoning_tokens <= billed.completion_tokens
    if metered.source == "upstream":
        assert billed == usage and metered.note is None
    else:
        assert metered.source == "capped" and metered.note is not None
        assert metered.note.startswith("usage capped for review")
        assert (usage.prompt_tokens > PROMPT_BOUND) or (usage.completion_tokens > OUTPUT_BOUND)


@FAST_OR_LONG
def test_parsing_refuses_or_bounds_every_usage(long: bool) -> None:
    fuzz(st.fixed_dictionaries({"raw": st.one_of(usages, plausible)}), check_parsing,
         examples=500, long=long)


@FAST_OR_LONG
def test_anthropic_and_responses_usage_is_refused_or_bounded_the_same_way(long: bool) -> None:
    fuzz(st.one_of(st.fixed_dictionaries({"raw": anthropic_usages,
                                          "protocol": st.just("anthropic")}),
                   st.fixed_dictionaries({"raw": responses_usages,
                                          "protocol": st.just("responses")})),
         check_parsing, examples=500, long=long)


# --------------------------------------------------------------------------- end to end


def check_one_request(tw: Tollway, raw: Any, *, stream: bool, where: int) -> None:
    """Send one request whose upstream reports ``raw`` and check its record and balance."""
    tw.begin_test()
    account = tw.account(usd="10")
    key = tw.key(account)
    text = "".join(PIECES)
    if not stream:
        tw.fake.hostile = replying(json.dumps(answer(raw, text)).encode())
    else:
        parts = [chunk([delta(p)]) for p in PIECES]
        # where: 0 no usage at all, 1 in a content chunk, 2 in a final usage chunk
        if where == 1:
            parts[2] = chunk([delta(PIECES[2])], usage=raw)
        elif where == 2:
            parts.append(chunk([], usage=raw))
        tw.fake.hostile = streaming(*parts, DONE)
    response = tw.http().post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "gpt-test", "messages": HELLO, "max_tokens": 50,
                                    "stream": stream})
    assert response.status_code == 200, response.text
    (record,) = tw.records()
    assert record["request_id"] == response.headers["x-request-id"]
    billed = TokenUsage(record["input_tokens"], record["output_tokens"],
                        record["cached_input_tokens"], record["cache_write_tokens"])
    assert record["type"] == "consume" and record["cost_nano"] == cost(billed)
    assert tw.balance(account) == (10 * USD - record["cost_nano"], 0)
    source = record["usage_source"]
    reported = raw if not stream or where else None
    if source == "estimated":  # the local count: prompt 8, "Hello there, friend!" 5
        assert (billed.prompt_tokens, billed.completion_tokens) == (8, 5)
        assert record["note"].startswith("usage estimated locally")
    else:
        usage, _ = parse_openai_usage(reported)  # it was readable
        if source == "upstream":
            assert billed == usage and record["note"] is None
        else:
            assert source == "capped" and record["note"].startswith("usage capped for review")
            assert billed.prompt_tokens <= PROMPT_BOUND
            assert billed.completion_tokens <= OUTPUT_BOUND


@FAST_OR_LONG
def test_any_reported_usage_is_billed_exactly_capped_or_estimated(served: Tollway,
                                                                  long: bool) -> None:
    def check(raw: Any, stream: bool, where: int) -> None:
        check_one_request(served, raw, stream=stream, where=where)
        assert served.open_holds() == 0

    fuzz(st.fixed_dictionaries({"raw": st.one_of(usages, plausible), "stream": st.booleans(),
                                "where": st.integers(0, 2)}), check, examples=12, long=long)


@FAST_OR_LONG
def test_plausible_usage_is_billed_exactly_as_reported(served: Tollway, long: bool) -> None:
    def check(raw: Any, stream: bool) -> None:
        check_one_request(served, raw, stream=stream, where=2)
        assert served.records()[0]["usage_source"] == "upstream"

    fuzz(st.fixed_dictionaries({"raw": plausible, "stream": st.booleans()}), check,
         examples=4, long=long)


def test_the_books_verify_after_the_fuzzing(served: Tollway) -> None:
    assert served.open_holds() == 0
    assert served.verify() == []
