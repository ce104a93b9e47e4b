"""The LLM gateway end to end: the official ``openai`` package (sync and async, streaming and
not) → Tollway under uvicorn → a fake OpenAI-compatible upstream on 127.0.0.1, on SQLite and
PostgreSQL.

Every charge is computed by hand in the test (the arithmetic is in the comments) and compared
to the nano-USD on the usage record, in the ``X-Tollway-Cost-USD`` header or the stream's
usage chunk, and to the balance after. Prices of the fake catalog (USD per 1M tokens):
``gpt-test`` input 0.15, output 0.60, cache read 0.075 (vip override 0.7);
``reasoner-test`` 1.10 / 4.40 / 0.55; ``embed-test`` input 0.02. Groups: default 1,
vip 0.8, half 0.5. Accounts start with 10 USD unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from fakes import (
    IGNORE_TOKENIZER_WARNING,
    MAX_BODY_BYTES,
    UPSTREAM_KEY,
    USD,
    LLMScript,
    Tollway,
    error_of,
    read_then_leave,
    sse_events,
)
from tollway import tokens
from tollway.clock import now_ms

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)
sqlite_only = pytest.mark.parametrize("served", ["sqlite"], indirect=True)

TEN_USD = 10 * USD
HELLO = [{"role": "user", "content": "hello there"}]


def only_record(tw: Tollway) -> dict[str, Any]:
    records = tw.records()
    assert len(records) == 1, records
    return records[0]


def assert_books_clean(tw: Tollway) -> None:
    """No hold left open, and the ledger recomputes from its postings."""
    assert tw.open_holds() == 0
    assert tw.verify() == []


def no_secret_forwarded(tw: Tollway, secret: str) -> None:
    """The customer's Tollway key reached no upstream, in any header, query or body."""
    assert tw.fake is not None
    for request in tw.fake.requests:
        assert secret not in json.dumps([request.headers, request.query, request.path])
        assert secret.encode() not in request.body


# --------------------------------------------------------------------------- non-streaming


def test_chat_bills_cached_and_reasoning_tokens_exactly(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account, name="laptop")
    tw.fake.llm = LLMScript(prompt_tokens=2000, cached_tokens=1500, completion_tokens=300,
                            reasoning_tokens=200)
    raw = tw.client(key).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO)
    completion = raw.parse()

    # (prompt − cached) × input + cached × cache_read + completion × output, per 1M, × 1:
    # (500 × 0.15 + 1500 × 0.075 + 300 × 0.60) / 1e6 = (75 + 112.5 + 180) / 1e6
    # = 0.0003675 USD = 367_500 nano-USD (reasoning tokens are inside the 300 completion).
    cost = 367_500
    assert raw.headers["x-tollway-cost-usd"] == "0.000367500"
    assert completion.choices[0].message.content == "Hello there, friend!"
    assert completion.usage is not None and completion.usage.prompt_tokens == 2000

    record = only_record(tw)
    assert record["request_id"] == raw.headers["x-request-id"]
    assert {k: record[k] for k in (
        "account_id", "key_name", "group_name", "ratio", "ratio_source", "type", "billing_type",
        "product", "route", "status", "stream", "input_tokens", "cached_input_tokens",
        "cache_write_tokens", "output_tokens", "reasoning_tokens", "calls",
        "input_nano_per_1m", "output_nano_per_1m", "cache_read_nano_per_1m",
        "cache_write_nano_per_1m", "per_call_nano", "cost_nano", "usage_source", "error_code",
    )} == {
        "account_id": account, "key_name": "laptop", "group_name": "default", "ratio": "1",
        "ratio_source": "group", "type": "consume", "billing_type": "token",
        "product": "gpt-test", "route": "/v1/chat/completions", "status": 200,
        "stream": False, "input_tokens": 2000, "cached_input_tokens": 1500,
        "cache_write_tokens": 0, "output_tokens": 300, "reasoning_tokens": 200, "calls": 0,
        "input_nano_per_1m": 150_000_000, "output_nano_per_1m": 600_000_000,
        "cache_read_nano_per_1m": 75_000_000,
        "cache_write_nano_per_1m": 150_000_000,  # no cache-write price: the input price
        "per_call_nano": None, "cost_nano": cost, "usage_source": "upstream",
        "error_code": None,
    }
    assert record["hold_id"] is not None and record["price_version_id"] is not None
    assert record["duration_ms"] >= 0 and record["ttft_ms"] is not None
    assert tw.balance(account) == (TEN_USD - cost, 0)
    assert_books_clean(tw)

    # What went upstream: the upstream model name, the operator's key, nothing of the client's.
    (forwarded,) = tw.fake.llm_requests()
    assert forwarded.path == "/v1/chat/completions"
    assert forwarded.json() == {"model": "upstream-gpt-4o-mini", "messages": HELLO}
    assert forwarded.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    no_secret_forwarded(tw, key)


def test_async_client_and_a_model_with_its_own_prices(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.llm = LLMScript(prompt_tokens=1234, cached_tokens=1024, completion_tokens=1500,
                            reasoning_tokens=1200)

    async def call() -> Any:
        async with tw.aclient(key) as client:
            return await client.chat.completions.with_raw_response.create(
                model="reasoner-test", messages=HELLO, max_completion_tokens=1800)

    raw = asyncio.run(call())
    # (210 × 1.10 + 1024 × 0.55 + 1500 × 4.40) / 1e6 = (231 + 563.2 + 6600) / 1e6
    # = 0.0073942 USD = 7_394_200 nano-USD
    assert raw.headers["x-tollway-cost-usd"] == "0.007394200"
    record = only_record(tw)
    assert (record["cost_nano"], record["product"], record["reasoning_tokens"]) == (
        7_394_200, "reasoner-test", 1200)
    # No upstream_model in the catalog: the id itself goes upstream, and max_completion_tokens
    # (the client's own, affordable) is passed through untouched.
    forwarded = tw.fake.llm_requests()[0].json()
    assert (forwarded["model"], forwarded["max_completion_tokens"]) == ("reasoner-test", 1800)
    assert tw.available(account) == TEN_USD - 7_394_200
    assert_books_clean(tw)


def test_group_ratio_override_and_plain_group_ratios(tw: Tollway) -> None:
    acme = tw.account("acme")
    vip_key = tw.key(acme, group="vip")  # the key is pinned to vip; the account is default
    halves = tw.account("halves", group="half")
    half_key = tw.key(halves)
    tw.fake.llm = LLMScript(prompt_tokens=1001, cached_tokens=1, completion_tokens=500)

    tw.client(vip_key).chat.completions.create(model="gpt-test", messages=HELLO)
    tw.client(vip_key).chat.completions.create(model="reasoner-test", messages=HELLO)
    tw.client(half_key).chat.completions.create(model="gpt-test", messages=HELLO)
    vip_gpt, vip_reasoner, half_gpt = tw.records()

    # gpt-test, vip: the model's override 0.7 beats the group's 0.8.
    # (1000 × 0.15 + 1 × 0.075 + 500 × 0.60) / 1e6 = 450.075e-6 USD = 450_075 nano;
    # × 0.7 = 315_052.5 → rounded half-up once: 315_053.
    assert (vip_gpt["group_name"], vip_gpt["ratio"], vip_gpt["ratio_source"],
            vip_gpt["cost_nano"]) == ("vip", "0.7", "model", 315_053)
    # reasoner-test has no override: vip's own 0.8.
    # (1000 × 1.10 + 1 × 0.55 + 500 × 4.40) / 1e6 = 3300.55e-6 USD = 3_300_550 nano;
    # × 0.8 = 2_640_440.
    assert (vip_reasoner["group_name"], vip_reasoner["ratio"], vip_reasoner["ratio_source"],
            vip_reasoner["cost_nano"]) == ("vip", "0.8", "group", 2_640_440)
    # The account's group (half, 0.5): 450_075 × 0.5 = 225_037.5 → 225_038.
    assert (half_gpt["group_name"], half_gpt["ratio"], half_gpt["ratio_source"],
            half_gpt["cost_nano"]) == ("half", "0.5", "group", 225_038)

    assert tw.available(acme) == TEN_USD - 315_053 - 2_640_440
    assert tw.available(halves) == TEN_USD - 225_038
    assert_books_clean(tw)


@sqlite_only
def test_embeddings_and_completions_routes(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    tw.fake.llm = LLMScript(usage={"prompt_tokens": 8, "total_tokens": 8})
    raw = client.embeddings.with_raw_response.create(model="embed-test", input="some text")
    # 8 × 0.02 / 1e6 = 0.16e-6 USD = 160 nano-USD (input only)
    assert raw.headers["x-tollway-cost-usd"] == "0.000000160"
    assert raw.parse().data[0].embedding == [0.5, -0.25]

    tw.fake.llm = LLMScript(prompt_tokens=12, completion_tokens=5)
    raw = client.completions.with_raw_response.create(model="gpt-test", prompt="Say hi",
                                                      max_tokens=50)
    # (12 × 0.15 + 5 × 0.60) / 1e6 = (1.8 + 3) / 1e6 = 4_800 nano-USD
    assert raw.headers["x-tollway-cost-usd"] == "0.000004800"
    embedding, completion = tw.records()
    assert (embedding["route"], embedding["input_tokens"], embedding["output_tokens"],
            embedding["cost_nano"]) == ("/v1/embeddings", 8, 0, 160)
    assert (completion["route"], completion["cost_nano"]) == ("/v1/completions", 4_800)
    assert [r.path for r in tw.fake.llm_requests()] == ["/v1/embeddings", "/v1/completions"]
    assert tw.available(account) == TEN_USD - 160 - 4_800
    assert_books_clean(tw)


@sqlite_only
def test_compressed_upstream_answers_are_decoded(tw: Tollway) -> None:
    """Upstreams gzip their answers when asked (aiohttp asks by default): the gateway must
    read them, not fail with "not a JSON object"."""
    key = tw.key(tw.account())
    tw.fake.compress_llm = True
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=5)
    raw = tw.client(key).chat.completions.with_raw_response.create(model="gpt-test",
                                                                  messages=HELLO)
    assert raw.parse().choices[0].message.content == "Hello there, friend!"
    # (10 × 0.15 + 5 × 0.60) / 1e6 = 4.5e-6 USD
    assert raw.headers["x-tollway-cost-usd"] == "0.000004500"


# --------------------------------------------------------------------------- streaming


def test_stream_with_the_clients_include_usage(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.llm = LLMScript(prompt_tokens=2000, cached_tokens=1500, completion_tokens=300,
                            reasoning_tokens=200)
    stream = tw.client(key).chat.completions.create(
        model="gpt-test", messages=HELLO, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello there, friend!"
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens
                                       ) == (2000, 300)
    # Same usage as the non-streaming test: 367_500 nano-USD, reported in the extra field.
    extra = last.model_extra or {}
    record = only_record(tw)
    assert extra["tollway"] == {"cost_usd": "0.000367500", "request_id": record["request_id"],
                                "usage_source": "upstream"}
    assert (record["stream"], record["usage_source"], record["cost_nano"], record["input_tokens"],
            record["cached_input_tokens"], record["output_tokens"],
            record["reasoning_tokens"]) == (True, "upstream", 367_500, 2000, 1500, 300, 200)
    assert record["ttft_ms"] is not None
    forwarded = tw.fake.llm_requests()[0].json()
    assert forwarded["stream"] is True and forwarded["stream_options"] == {"include_usage": True}
    assert forwarded["model"] == "upstream-gpt-4o-mini"
    assert tw.balance(account) == (TEN_USD - 367_500, 0)
    assert_books_clean(tw)


def test_stream_without_include_usage_is_still_billed_from_upstream_usage(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.llm = LLMScript(prompt_tokens=40, completion_tokens=5)

    async def call() -> list[Any]:
        async with tw.aclient(key) as client:
            stream = await client.chat.completions.create(model="gpt-test", messages=HELLO,
                                                          stream=True)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(call())
    # The client did not ask for usage: it sees none (no usage chunk, no usage field).
    assert all(c.usage is None and c.choices for c in chunks)
    assert all("tollway" not in (c.model_extra or {}) for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello there, friend!"
    # ...but the gateway asked the upstream for it, and bills from it:
    # (40 × 0.15 + 5 × 0.60) / 1e6 = (6 + 3) / 1e6 = 9_000 nano-USD.
    assert tw.fake.llm_requests()[0].json()["stream_options"] == {"include_usage": True}
    record = only_record(tw)
    assert (record["usage_source"], record["input_tokens"], record["output_tokens"],
            record["cost_nano"]) == ("upstream", 40, 5, 9_000)
    assert tw.available(account) == TEN_USD - 9_000
    assert_books_clean(tw)


@sqlite_only
def test_stream_reports_its_cost_in_a_final_comment(tw: Tollway) -> None:
    key = tw.key(tw.account())
    tw.fake.llm = LLMScript(prompt_tokens=40, completion_tokens=5)
    response = tw.http().post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "gpt-test", "messages": HELLO, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    # 9_000 nano-USD, as above; the comment precedes [DONE]; no usage event was asked for.
    assert response.content.endswith(b": tollway cost_usd=0.000009000\n\ndata: [DONE]\n\n")
    assert all(b'"usage": {' not in e for e in sse_events(response.content))


def test_stream_the_upstream_cuts_is_billed_as_estimated(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    # Pieces with trailing spaces, as some upstreams chunk: the estimate must count the
    # delivered text, not each chunk on its own.
    tw.fake.llm = LLMScript(content=["Once ", "upon ", "a ", "time ", "there ", "was"],
                            cut_after=3)
    messages = [{"role": "user", "content": "Tell me a story"}]
    stream = tw.client(key).chat.completions.create(model="gpt-test", messages=messages,
                                                    stream=True)
    chunks = list(stream)  # the stream just ends: no [DONE], no usage
    delivered = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert delivered == "Once upon a "

    record = only_record(tw)
    # Prompt, by the tokenizer: the message's text plus OpenAI's framing (3 per message and 3
    # priming the reply); output: the tokens of the text that reached the client.
    assert tokens.count("Tell me a story") == 4
    assert tokens.count("Once upon a ") == 4  # "Once" " upon" " a" " "
    prompt, output = 4 + 3 + 3, 4
    # (10 × 0.15 + 4 × 0.60) / 1e6 = (1.5 + 2.4) / 1e6 = 3_900 nano-USD: never zero.
    assert (record["usage_source"], record["input_tokens"], record["output_tokens"],
            record["cost_nano"], record["type"], record["stream"]) == (
        "estimated", prompt, output, 3_900, "consume", True)
    assert "broke off" in (record["note"] or "")
    assert tw.available(account) == TEN_USD - 3_900
    assert_books_clean(tw)


@sqlite_only
def test_stream_whose_upstream_sends_no_usage_is_estimated(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.llm = LLMScript(stream_usage=False)  # ignores stream_options.include_usage
    chunks = list(tw.client(key).chat.completions.create(
        model="gpt-test", messages=HELLO, stream=True, stream_options={"include_usage": True}))
    # The client asked for usage; the gateway has only an estimate, and says so.
    assert tokens.count("hello there") == 2
    assert tokens.count("Hello there, friend!") == 5
    # prompt 2 + 3 + 3 = 8, output 5: (8 × 0.15 + 5 × 0.60) / 1e6 = 4_200 nano-USD
    record = only_record(tw)
    assert (record["usage_source"], record["input_tokens"], record["output_tokens"],
            record["cost_nano"]) == ("estimated", 8, 5, 4_200)
    assert all(c.usage is None for c in chunks)
    assert tw.available(account) == TEN_USD - 4_200


def test_client_that_disconnects_mid_stream_pays_for_what_was_delivered(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    pieces = ["One", " two", " three", " four", " five", " six", " seven", " eight"]
    tw.fake.llm = LLMScript(content=pieces, chunk_delay=0.6)

    events = asyncio.run(read_then_leave(tw.url + "/v1/chat/completions", key, {
        "model": "gpt-test", "messages": HELLO, "stream": True}))
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == [
        "One", " two"]

    records = tw.wait_records(1)
    assert len(records) == 1
    record = records[0]
    # Delivered: "One two" = 2 tokens. Prompt 2 + 3 + 3 = 8 (see the test above).
    # (8 × 0.15 + 2 × 0.60) / 1e6 = (1.2 + 1.2) / 1e6 = 2_400 nano-USD.
    assert tokens.count("One two") == 2
    assert (record["usage_source"], record["input_tokens"], record["output_tokens"],
            record["cost_nano"], record["status"]) == ("estimated", 8, 2, 2_400, 200)
    assert "disconnected" in (record["note"] or "")
    # The gateway stopped reading: the fake saw its reader go away before the end.
    for _ in range(100):
        if tw.fake.aborted_streams:
            break
        time.sleep(0.05)
    assert tw.fake.aborted_streams == 1
    assert len(tw.records()) == 1  # still exactly one record
    assert tw.balance(account) == (TEN_USD - 2_400, 0)
    assert_books_clean(tw)


# --------------------------------------------------------------------------- upstream failures


def test_upstream_500_is_a_502_and_costs_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.llm = LLMScript(status=500)
    with pytest.raises(openai.APIStatusError) as caught:
        tw.client(key).chat.completions.create(model="gpt-test", messages=HELLO)
    assert caught.value.status_code == 502
    error = error_of(caught.value.response)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")
    record = only_record(tw)
    assert (record["type"], record["status"], record["cost_nano"], record["error_code"],
            record["request_id"]) == ("error", 502, 0, "upstream_error", error["request_id"])
    assert tw.balance(account) == (TEN_USD, 0)
    assert_books_clean(tw)


def test_upstream_timeout_is_a_504_and_costs_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.llm = LLMScript(delay=3.5)  # TOLLWAY_UPSTREAM_READ_TIMEOUT_SECONDS=2
    with pytest.raises(openai.APIStatusError) as caught:
        tw.client(key).chat.completions.create(model="gpt-test", messages=HELLO)
    assert caught.value.status_code == 504
    error = error_of(caught.value.response)
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_timeout")
    record = only_record(tw)
    assert (record["type"], record["status"], record["cost_nano"], record["error_code"]) == (
        "error", 504, 0, "upstream_timeout")
    assert tw.balance(account) == (TEN_USD, 0)
    assert_books_clean(tw)


def test_upstream_4xx_passes_through_and_costs_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    body = {"error": {"message": "max_tokens is too large", "type": "invalid_request_error",
                      "param": "max_tokens", "code": None}}
    tw.fake.llm = LLMScript(status=400, error_body=body)
    response = tw.http().post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "gpt-test", "messages": HELLO})
    assert response.status_code == 400
    assert response.json() == body  # the upstream's own answer, unchanged
    assert response.headers["content-type"].startswith("application/json")
    with pytest.raises(openai.BadRequestError):
        tw.client(key).chat.completions.create(model="gpt-test", messages=HELLO)
    records = tw.records()
    assert [(r["type"], r["status"], r["cost_nano"]) for r in records] == [
        ("error", 400, 0), ("error", 400, 0)]
    assert records[0]["request_id"] == response.headers["x-request-id"]
    assert tw.balance(account) == (TEN_USD, 0)
    assert_books_clean(tw)


@sqlite_only
def test_garbage_from_the_upstream_never_charges_silently(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    # A 2xx that is not JSON: 502, nothing charged, an error record.
    tw.fake.llm = LLMScript(raw_body=b"<html>oops</html>")
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-test", messages=HELLO)
    assert caught.value.status_code == 502
    assert error_of(caught.value.response)["code"] == "upstream_error"
    # Impossible usage (negative): estimated locally instead, and said so.
    tw.fake.llm = LLMScript(usage={"prompt_tokens": -5, "completion_tokens": 3})
    client.chat.completions.create(model="gpt-test", messages=HELLO)
    # Absurd usage (far beyond the request's bounds): capped for review.
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=10**9)
    client.chat.completions.create(model="gpt-test", messages=HELLO, max_tokens=50)
    garbage, negative, absurd = tw.records()
    assert (garbage["type"], garbage["cost_nano"]) == ("error", 0)
    # Estimated: prompt 8 (as above), output "Hello there, friend!" = 5 tokens: 4_200 nano-USD.
    assert (negative["usage_source"], negative["input_tokens"], negative["output_tokens"],
            negative["cost_nano"]) == ("estimated", 8, 5, 4_200)
    # Capped at max_tokens 50: (10 × 0.15 + 50 × 0.60) / 1e6 = 31.5e-6 USD = 31_500 nano-USD.
    assert (absurd["output_tokens"], absurd["cost_nano"]) == (50, 31_500)
    assert "capped" in (absurd["note"] or "")
    assert tw.available(account) == TEN_USD - 4_200 - 31_500
    assert_books_clean(tw)


# --------------------------------------------------------------------------- holds and balance


def test_402_when_the_balance_cannot_cover_the_minimum(tw: Tollway) -> None:
    # "hello there": the hold estimate is ceil(11 bytes / 3) + 3 + 3 = 10 prompt tokens, so
    # the smallest hold (one output token) is (10 × 0.15 + 1 × 0.60) / 1e6 = 2_100 nano-USD.
    account = tw.account(nano=2_099)
    key = tw.key(account)
    with pytest.raises(openai.APIStatusError) as caught:
        tw.client(key).chat.completions.create(model="gpt-test", messages=HELLO)
    assert caught.value.status_code == 402
    error = error_of(caught.value.response)
    assert (error["type"], error["code"]) == ("billing_error", "insufficient_balance")
    assert tw.fake.requests == []  # nothing forwarded
    assert tw.records() == []
    assert tw.balance(account) == (2_099, 0)
    assert_books_clean(tw)


def test_max_tokens_lowered_to_what_the_balance_affords(tw: Tollway) -> None:
    # The hold for N output tokens is (10 × 0.15 + N × 0.60) / 1e6 USD = 1_500 + 600 N nano
    # (10 = the prompt estimate above). 61_500 nano covers exactly N = 100 (101 needs 62_100),
    # short of the model's max_output_tokens (1000), which the client left unset.
    account = tw.account(nano=61_500)
    key = tw.key(account)
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=100)
    raw = tw.client(key).chat.completions.with_raw_response.create(model="gpt-test",
                                                                  messages=HELLO)
    assert raw.headers["x-tollway-max-tokens"] == "100"
    assert tw.fake.llm_requests()[0].json()["max_tokens"] == 100
    # Charged (10 × 0.15 + 100 × 0.60) / 1e6 = 61_500 nano: the balance ends at exactly 0.
    assert raw.headers["x-tollway-cost-usd"] == "0.000061500"
    assert tw.balance(account) == (0, 0)
    assert_books_clean(tw)


def test_n_choices_are_all_billed_and_all_held_for(tw: Tollway) -> None:
    client = tw.client(tw.key(account := tw.account()))
    # n=3 × max_tokens 100: the upstream may generate (and bill) 300 completion tokens.
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=300)
    raw = client.chat.completions.with_raw_response.create(model="gpt-test", messages=HELLO,
                                                           n=3, max_tokens=100)
    # (10 × 0.15 + 300 × 0.60) / 1e6 = (1.5 + 180) / 1e6 = 181_500 nano-USD, not capped at 100
    assert raw.headers["x-tollway-cost-usd"] == "0.000181500"
    assert (only_record(tw)["output_tokens"], only_record(tw)["note"]) == (300, None)
    assert tw.available(account) == TEN_USD - 181_500

    # The hold covers every choice: 1_500 + 3 × 600 N nano for N tokens each. 91_500 nano
    # affords N = 50 (51 would need 93_300), so max_tokens is lowered to 50, not to 150.
    poor = tw.account(nano=91_500)
    tw.fake.reset()
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=150)
    raw = tw.client(tw.key(poor)).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO, n=3)
    assert raw.headers["x-tollway-max-tokens"] == "50"
    assert tw.fake.llm_requests()[0].json()["max_tokens"] == 50
    # (10 × 0.15 + 150 × 0.60) / 1e6 = 91_500 nano-USD: exactly the balance.
    assert tw.balance(poor) == (0, 0)
    assert_books_clean(tw)


@sqlite_only
def test_max_completion_tokens_is_the_field_lowered_when_the_client_set_it(tw: Tollway) -> None:
    account = tw.account(nano=61_500)
    key = tw.key(account)
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=7)
    stream = tw.client(key).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO, max_completion_tokens=500, stream=True)
    assert stream.headers["x-tollway-max-tokens"] == "100"
    list(stream.parse())
    forwarded = tw.fake.llm_requests()[0].json()
    assert forwarded["max_completion_tokens"] == 100 and "max_tokens" not in forwarded
    # (10 × 0.15 + 7 × 0.60) / 1e6 = 5_700 nano-USD
    assert tw.balance(account) == (61_500 - 5_700, 0)


def test_a_charge_beyond_hold_and_balance_is_written_off_never_overdrawn(tw: Tollway) -> None:
    # max_tokens 1: the hold is (10 × 0.15 + 1 × 0.60) / 1e6 = 2_100 nano; the balance 2_500.
    # The upstream then reports 4000 prompt tokens (within the bounds the gateway accepts):
    # (4000 × 0.15 + 1 × 0.60) / 1e6 = 600.6e-6 USD = 600_600 nano-USD. The hold pays 2_100,
    # the balance the remaining 400; the other 598_100 is written off: balance 0, not less.
    account = tw.account(nano=2_500)
    key = tw.key(account, quota_nano=USD)
    tw.fake.llm = LLMScript(prompt_tokens=4000, completion_tokens=1)
    raw = tw.client(key).chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO, max_tokens=1)
    assert raw.headers["x-tollway-cost-usd"] == "0.000600600"
    assert only_record(tw)["cost_nano"] == 600_600
    assert tw.balance(account) == (0, 0)
    assert_books_clean(tw)


# --------------------------------------------------------------------------- idempotency


def test_idempotent_retry_returns_the_first_answer_and_charges_once(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    tw.fake.llm = LLMScript(prompt_tokens=40, completion_tokens=5)
    first = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO, extra_headers={"Idempotency-Key": "order-42"})
    tw.fake.llm = LLMScript(content=["a", "different", "answer"])  # would differ if asked
    second = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO, extra_headers={"Idempotency-Key": "order-42"})

    assert second.http_response.content == first.http_response.content
    assert second.headers["x-tollway-replayed-request-id"] == first.headers["x-request-id"]
    assert second.headers["x-tollway-replayed"] == "true"  # not charged again
    assert "x-tollway-replayed" not in first.headers
    # (40 × 0.15 + 5 × 0.60) / 1e6 = 9_000 nano-USD, once.
    assert first.headers["x-tollway-cost-usd"] == second.headers["x-tollway-cost-usd"] == (
        "0.000009000")
    assert len(tw.fake.llm_requests()) == 1
    assert len(tw.records()) == 1
    assert tw.available(account) == TEN_USD - 9_000

    # The same key with a different request is a conflict, not a replay.
    response = tw.http().post(
        "/v1/chat/completions", json={"model": "gpt-test", "messages": [
            {"role": "user", "content": "something else"}]},
        headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "order-42"})
    assert response.status_code == 409
    assert error_of(response)["code"] == "idempotency_conflict"
    assert len(tw.fake.llm_requests()) == 1 and len(tw.records()) == 1
    assert tw.available(account) == TEN_USD - 9_000
    assert_books_clean(tw)


def test_idempotent_retry_of_a_stream_replays_it(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.llm = LLMScript(prompt_tokens=40, completion_tokens=5)
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "stream-7"}
    body = {"model": "gpt-test", "messages": HELLO, "stream": True,
            "stream_options": {"include_usage": True}}
    http = tw.http()
    first = http.post("/v1/chat/completions", json=body, headers=headers)
    again = http.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.headers["content-type"].startswith("text/event-stream")
    # the same stream, its cost object marked as a replay (not charged again)
    assert b'"replayed"' not in first.content and first.content.count(b'"tollway":{') == 1
    assert again.content == first.content.replace(
        b'"tollway":{', b'"tollway":{"replayed":true,').replace(
        b": tollway cost_usd=0.000009000", b": tollway cost_usd=0.000009000 replayed=true")
    assert again.headers["x-tollway-replayed-request-id"] == first.headers["x-request-id"]
    assert again.headers["x-tollway-replayed"] == "true"
    # (40 × 0.15 + 5 × 0.60) / 1e6 = 9_000 nano-USD, once; the upstream asked once.
    assert again.headers["x-tollway-cost-usd"] == "0.000009000"
    assert len(tw.fake.llm_requests()) == 1 and len(tw.records()) == 1
    # The openai package reads a replayed stream like any other.
    client = tw.client(key)
    streams = [list(client.chat.completions.create(
        model="gpt-test", messages=HELLO, stream=True, stream_options={"include_usage": True},
        extra_headers={"Idempotency-Key": "stream-8"})) for _ in range(2)]
    assert streams[0][:-1] == streams[1][:-1]
    assert (streams[0][-1].model_extra or {})["tollway"] == {
        "cost_usd": "0.000009000", "request_id": streams[0][-1].model_extra["tollway"][
            "request_id"], "usage_source": "upstream"}
    assert (streams[1][-1].model_extra or {})["tollway"] == {
        **streams[0][-1].model_extra["tollway"], "replayed": True}  # not charged again
    assert len(tw.fake.llm_requests()) == 2 and len(tw.records()) == 2
    assert tw.available(account) == TEN_USD - 2 * 9_000
    assert_books_clean(tw)


@sqlite_only
def test_a_failed_request_may_be_retried_with_the_same_idempotency_key(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    tw.fake.llm = LLMScript(status=503)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="gpt-test", messages=HELLO,
                                       extra_headers={"Idempotency-Key": "retry-me"})
    tw.fake.llm = LLMScript(prompt_tokens=40, completion_tokens=5)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=HELLO, extra_headers={"Idempotency-Key": "retry-me"})
    assert "x-tollway-replayed-request-id" not in raw.headers
    assert [(r["type"], r["cost_nano"]) for r in tw.records()] == [("error", 0),
                                                                   ("consume", 9_000)]
    assert tw.available(account) == TEN_USD - 9_000


# --------------------------------------------------------------------------- refusals


def test_refusals_have_the_exact_error_shape_and_charge_nothing(tw: Tollway) -> None:
    account = tw.account()
    good = tw.key(account)
    revoked = tw.key(account, name="revoked")
    expired = tw.key(account, name="expired", expires_at_ms=now_ms() - 1000)
    narrow = tw.key(account, name="narrow", models=["reasoner-test"])
    http = tw.http()
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=5)
    tw.client(revoked).chat.completions.create(model="gpt-test", messages=HELLO)  # works...
    tw.revoke(revoked)  # ...until revoked (TOLLWAY_KEY_CACHE_SECONDS=0: at once)
    before = tw.balance(account)
    records_before = len(tw.records())
    forwarded_before = len(tw.fake.requests)

    def post(key: str | None, body: bytes | dict[str, Any], path: str = "/v1/chat/completions",
             **headers: str) -> httpx.Response:
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if isinstance(body, dict):
            return http.post(path, json=body, headers=headers)
        return http.post(path, content=body, headers=headers)

    chat = {"model": "gpt-test", "messages": HELLO}
    cases = [
        (post(None, chat), 401, "authentication_error", "invalid_api_key"),
        (post("tw-not-a-real-key", chat), 401, "authentication_error", "invalid_api_key"),
        (post(revoked, chat), 401, "authentication_error", "revoked_api_key"),
        (post(expired, chat), 401, "authentication_error", "expired_api_key"),
        (post(narrow, chat), 403, "permission_error", "model_not_allowed"),
        (post(good, {"model": "gpt-5-ultra", "messages": HELLO}), 404, "not_found_error",
         "unknown_model"),
        (http.get("/apis/v1/no/such/api", headers={"Authorization": f"Bearer {good}"}), 404,
         "not_found_error", "unknown_endpoint"),
        (http.post("/apis/v1/twitter/user/jack", headers={"Authorization": f"Bearer {good}"}),
         404, "not_found_error", "unknown_endpoint"),  # the endpoint is GET only
        (post(good, b'{"model": "gpt-test", "messages": ['), 400, "invalid_request_error",
         "invalid_request"),
        (post(good, b'["gpt-test"]'), 400, "invalid_request_error", "invalid_request"),
        (post(good, {"messages": HELLO}), 400, "invalid_request_error", "invalid_request"),
        (post(good, {"model": "gpt-test", "messages": HELLO, "max_tokens": -1}), 400,
         "invalid_request_error", "invalid_request"),
        (post(good, {"model": "gpt-test", "messages": HELLO, "n": 0}), 400,
         "invalid_request_error", "invalid_request"),
        (post(good, {"model": "gpt-test", "messages": [
            {"role": "user", "content": "x" * MAX_BODY_BYTES}]}), 413,
         "invalid_request_error", "payload_too_large"),
        (post(good, {"input": "x"}, "/v1/embeddings"), 400, "invalid_request_error",
         "invalid_request"),
    ]
    for response, status, type_, code in cases:
        assert response.status_code == status, (code, response.text)
        error = error_of(response)
        assert (error["type"], error["code"]) == (type_, code), error

    # The openai package sees the same, as its typed errors.
    with pytest.raises(openai.AuthenticationError) as auth:
        tw.client(revoked).chat.completions.create(model="gpt-test", messages=HELLO)
    assert error_of(auth.value.response)["code"] == "revoked_api_key"
    with pytest.raises(openai.PermissionDeniedError):
        tw.client(narrow).chat.completions.create(model="gpt-test", messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        tw.client(good).chat.completions.create(model="nope", messages=HELLO)

    assert len(tw.fake.requests) == forwarded_before  # nothing reached the upstream
    assert len(tw.records()) == records_before
    assert tw.balance(account) == before
    assert_books_clean(tw)


def test_key_quota_is_enforced_and_never_overspent(tw: Tollway) -> None:
    account = tw.account()
    # twitter-user costs 0.002 USD a call; the key may spend 0.005: two calls, not three.
    key = tw.key(account, quota_nano=5_000_000)
    other = tw.key(account, name="other")

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=tw.url, timeout=20) as client:
            responses = await asyncio.gather(*[
                client.get(f"/apis/v1/twitter/user/u{i}",
                           headers={"Authorization": f"Bearer {key}"}) for i in range(8)])
        for response in responses:
            if response.status_code == 429:
                assert error_of(response)["code"] == "quota_exceeded"
        return sorted(r.status_code for r in responses)

    assert asyncio.run(burst()) == [200, 200] + [429] * 6
    # The LLM route is refused too when its hold exceeds what is left of the quota (0.001 USD):
    # (10 × 0.15 + 2 × 1000 × 0.60) / 1e6 = 1_201_500 nano-USD for 2 choices of max_tokens
    # 1000 (the model's maximum: a larger max_tokens is lowered to it before the hold).
    with pytest.raises(openai.RateLimitError) as caught:
        tw.client(key).chat.completions.create(model="gpt-test", messages=HELLO,
                                               max_tokens=1000, n=2)
    assert error_of(caught.value.response)["code"] == "quota_exceeded"
    # The account's other keys are unaffected.
    assert tw.http().get("/apis/v1/twitter/user/x",
                         headers={"Authorization": f"Bearer {other}"}).status_code == 200
    assert len(tw.fake.data_requests()) == 3
    record = tw.key_record(key)
    assert (record.used_nano, record.held_nano) == (4_000_000, 0)
    assert tw.available(account) == TEN_USD - 3 * 2_000_000
    assert_books_clean(tw)


def test_models_lists_only_what_the_key_may_use(tw: Tollway) -> None:
    account = tw.account()
    everything = tw.key(account)
    narrow = tw.key(account, models=["gpt-test", "twitter-user"])
    assert sorted(m.id for m in tw.client(everything).models.list()) == [
        "claude-test", "embed-test", "gpt-test", "image-test", "reasoner-test"]
    listed = list(tw.client(narrow).models.list())
    assert [m.id for m in listed] == ["gpt-test"]
    assert listed[0].owned_by == "fakeai"
    with pytest.raises(openai.AuthenticationError):
        tw.client("tw-wrong").models.list()
    assert tw.records() == []
