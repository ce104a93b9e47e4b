"""``POST /v1/messages`` end to end: the official ``anthropic`` package (streaming and not) →
Tollway under uvicorn → a fake Anthropic upstream on 127.0.0.1, on SQLite and PostgreSQL.

``claude-test`` prices (USD per 1M tokens): input 3, output 15, cache read 0.30, 5-minute
cache write 3.75, 1-hour cache write 6. Anthropic's ``input_tokens`` EXCLUDES cache reads and
writes, so the prompt billed is input + cache read + cache creation. Every charge is worked
out by hand in the comments. Groups: default 1, vip 0.8, half 0.5.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import pytest

from fakes import (
    IGNORE_TOKENIZER_WARNING,
    UPSTREAM_KEY,
    USD,
    AnthropicScript,
    LLMScript,
    Tollway,
)
from tollway import tokens

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

TEN_USD = 10 * USD
HELLO = [{"role": "user", "content": "hello there"}]


def claude(tw: Tollway, key: str | None, **kwargs: Any) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=tw.url, api_key=key, max_retries=0, timeout=20,
                                 **kwargs)
    tw._clients.append(client)
    return client


def only_record(tw: Tollway) -> dict[str, Any]:
    records = tw.wait_records(1)
    assert len(records) == 1, records
    return records[0]


def books_clean(tw: Tollway) -> None:
    assert tw.open_holds() == 0
    assert tw.verify() == []


def explanation(tw: Tollway, key: str, request_id: str) -> dict[str, Any]:
    response = tw.http().get(f"/v1/billing/usage/{request_id}",
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return dict(response.json())


# --------------------------------------------------------------------------- non-streaming


def test_messages_bill_cache_reads_and_5m_and_1h_writes_exactly(tw: Tollway) -> None:
    account = tw.account(group="half")
    key = tw.key(account)
    tw.fake.anthropic = AnthropicScript(input_tokens=101, output_tokens=50,
                                        cache_read_input_tokens=2000,
                                        cache_creation_input_tokens=700, cache_split=(200, 500))
    tools = [{"name": "lookup", "description": "Look a word up",
              "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}}]
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]}]
    raw = claude(tw, key).messages.with_raw_response.create(
        model="claude-test", max_tokens=300, messages=messages, tools=tools,
        extra_headers={"anthropic-version": "2023-06-01", "anthropic-beta": "beta-x"})
    message = raw.parse()
    assert message.content[0].text == "Hello from Claude."  # type: ignore[union-attr]
    assert message.usage.cache_read_input_tokens == 2000

    # prompt = 101 input + 2000 read + 700 created (200 for 5 minutes, 500 for 1 hour)
    # 101 × 3 + 2000 × 0.30 + 200 × 3.75 + 500 × 6 + 50 × 15
    # = 303 + 600 + 750 + 3000 + 750 = 5403 per 1M = 0.005403 USD, × 0.5 (half)
    # = 0.0027015 USD = 2_701_500 nano-USD
    cost = 2_701_500
    assert raw.headers["x-tollway-cost-usd"] == "0.002701500"
    record = only_record(tw)
    assert {k: record[k] for k in (
        "route", "product", "status", "stream", "input_tokens", "cached_input_tokens",
        "cache_write_tokens", "cache_write_1h_tokens", "output_tokens", "input_nano_per_1m",
        "cache_read_nano_per_1m", "cache_write_nano_per_1m", "cache_write_1h_nano_per_1m",
        "output_nano_per_1m", "cost_nano", "usage_source", "ratio")} == {
        "route": "/v1/messages", "product": "claude-test", "status": 200, "stream": False,
        "input_tokens": 2801, "cached_input_tokens": 2000, "cache_write_tokens": 200,
        "cache_write_1h_tokens": 500, "output_tokens": 50,
        "input_nano_per_1m": 3 * USD, "cache_read_nano_per_1m": 300_000_000,
        "cache_write_nano_per_1m": 3_750_000_000, "cache_write_1h_nano_per_1m": 6 * USD,
        "output_nano_per_1m": 15 * USD, "cost_nano": cost, "usage_source": "upstream",
        "ratio": "0.5"}
    assert tw.balance(account) == (TEN_USD - cost, 0)
    books_clean(tw)

    view = explanation(tw, key, record["request_id"])
    assert view["pricing"] == {
        "billing_type": "token", "price_version": record["price_version_id"],
        "ratio": "0.5", "ratio_source": "group", "unit": "per 1M tokens",
        "components": [
            {"name": "input", "quantity": 101, "unit_price_usd": "3", "amount_usd": "0.000303"},
            {"name": "cache_read", "quantity": 2000, "unit_price_usd": "0.3",
             "amount_usd": "0.0006"},
            {"name": "cache_write", "quantity": 200, "unit_price_usd": "3.75",
             "amount_usd": "0.00075"},
            {"name": "cache_write_1h", "quantity": 500, "unit_price_usd": "6",
             "amount_usd": "0.003"},
            {"name": "output", "quantity": 50, "unit_price_usd": "15",
             "amount_usd": "0.00075"}],
        "exact_usd": "0.0027015", "rounded_usd": "0.002701500",
        "formula": "((2801 − 2000 − 200 − 500) × 3 + 2000 × 0.3 + 200 × 3.75 + 500 × 6 + "
                   "50 × 15) / 1000000 × 0.5 = 0.0027015 → 0.002701500 USD",
        "charged": True}
    assert view["unit_prices_usd"]["cache_write_1h_per_1m"] == "6.000000000"

    # Forwarded untouched but for the model name; the operator's key, the client's version.
    (forwarded,) = tw.fake.llm_requests()
    assert forwarded.path == "/anthropic/v1/messages"
    assert forwarded.json() == {"model": "claude-upstream", "max_tokens": 300,
                                "messages": messages, "tools": tools}
    assert forwarded.headers["x-api-key"] == UPSTREAM_KEY
    assert forwarded.headers["anthropic-version"] == "2023-06-01"
    assert forwarded.headers["anthropic-beta"] == "beta-x"
    assert "authorization" not in forwarded.headers
    assert key not in json.dumps(forwarded.headers)


def test_one_model_two_protocols_one_price(tw: Tollway) -> None:
    """claude-test through /v1/chat/completions (OpenAI-compatible upstream, OpenAI usage
    semantics) costs what the same tokens cost through /v1/messages."""
    account = tw.account()
    key = tw.key(account)
    # OpenAI semantics: prompt 2100 INCLUDES 2000 cached
    tw.fake.llm = LLMScript(prompt_tokens=2100, cached_tokens=2000, completion_tokens=50)
    import openai

    client = openai.OpenAI(base_url=tw.url + "/v1", api_key=key, max_retries=0)
    tw._clients.append(client)
    client.chat.completions.create(model="claude-test", messages=HELLO)
    # Anthropic semantics: input 100 EXCLUDES the 2000 read
    tw.fake.anthropic = AnthropicScript(input_tokens=100, cache_read_input_tokens=2000,
                                        output_tokens=50)
    claude(tw, key).messages.create(model="claude-test", max_tokens=100, messages=HELLO)
    chat, messages = tw.records()
    # 100 × 3 + 2000 × 0.30 + 50 × 15 = 300 + 600 + 750 = 1650 per 1M = 1_650_000 nano
    assert (chat["route"], chat["cost_nano"]) == ("/v1/chat/completions", 1_650_000)
    assert (messages["route"], messages["cost_nano"]) == ("/v1/messages", 1_650_000)
    assert chat["price_version_id"] == messages["price_version_id"]
    # both explained the same way, every token kind with its price
    for record in (chat, messages):
        assert explanation(tw, key, record["request_id"])["pricing"]["formula"] == (
            "((2100 − 2000 − 0 − 0) × 3 + 2000 × 0.3 + 0 × 3.75 + 0 × 6 + 50 × 15) / 1000000 "
            "× 1 = 0.00165 → 0.001650000 USD")
    assert [r.path for r in tw.fake.llm_requests()] == ["/v1/chat/completions",
                                                       "/anthropic/v1/messages"]
    books_clean(tw)


# --------------------------------------------------------------------------- streaming


def test_stream_passes_every_event_through_in_order_and_bills_both_usage_events(
        tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.anthropic = AnthropicScript(input_tokens=20, cache_creation_input_tokens=1000,
                                        output_tokens=4)
    with claude(tw, key).messages.stream(model="claude-test", max_tokens=100,
                                         messages=HELLO) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert final.content[0].text == "Hello from Claude."  # type: ignore[union-attr]
    assert final.usage.output_tokens == 4
    sent = [line[7:] for line in tw.fake.streamed[-1].decode().splitlines()
            if line.startswith("event: ") and line != "event: ping"]
    # the SDK adds its own "text" events beside the content deltas; the wire events are all
    assert [k for k in kinds if k not in ("text",)] == sent

    # usage: message_start says 20 input (excluding) + 1000 created (no split: 5-minute);
    # message_delta says 4 output. 20 × 3 + 1000 × 3.75 + 4 × 15 = 60 + 3750 + 60
    # = 3870 per 1M = 3_870_000 nano-USD
    record = only_record(tw)
    assert (record["stream"], record["input_tokens"], record["cache_write_tokens"],
            record["cache_write_1h_tokens"], record["output_tokens"], record["cost_nano"],
            record["usage_source"]) == (True, 1020, 1000, 0, 4, 3_870_000, "upstream")
    assert tw.available(account) == TEN_USD - 3_870_000
    books_clean(tw)


def test_stream_bytes_are_the_upstreams_then_the_cost(tw: Tollway) -> None:
    """Byte for byte, with Bearer auth instead of x-api-key."""
    account = tw.account()
    key = tw.key(account)
    tw.fake.anthropic = AnthropicScript(input_tokens=10, output_tokens=4, error_event=False)
    with tw.http().stream("POST", "/v1/messages", headers={
            "Authorization": f"Bearer {key}", "anthropic-version": "2023-06-01"},
            json={"model": "claude-test", "max_tokens": 50, "messages": HELLO,
                  "stream": True}) as response:
        assert response.status_code == 200
        body = response.read()
    upstream_bytes = tw.fake.streamed[-1]
    # 10 × 3 + 4 × 15 = 90 per 1M = 90_000 nano
    assert body == upstream_bytes + b": tollway cost_usd=0.000090000\n\n"
    assert only_record(tw)["cost_nano"] == 90_000
    books_clean(tw)


def test_stream_cut_after_message_start_bills_what_was_delivered(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    # message_start reports 20 input + 300 read; the connection drops after 2 text deltas
    # ("Hello", " from"), so no message_delta ever reports output.
    tw.fake.anthropic = AnthropicScript(input_tokens=20, cache_read_input_tokens=300,
                                        output_tokens=4, cut_after=2)
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as failure:
        with claude(tw, key).messages.stream(model="claude-test", max_tokens=100,
                                             messages=HELLO) as stream:
            for text in stream.text_stream:
                received.append(text)
    assert "".join(received) == "Hello from"
    assert "broke off" in str(failure.value) or "stream" in str(failure.value)

    # delivered output "Hello from" = 2 tokens (o200k: "Hello", " from"), counted locally
    assert tokens.count("Hello from") == 2
    # 20 × 3 + 300 × 0.30 + 2 × 15 = 60 + 90 + 30 = 180 per 1M = 180_000 nano-USD
    record = only_record(tw)
    assert (record["input_tokens"], record["cached_input_tokens"], record["output_tokens"],
            record["cost_nano"], record["usage_source"], record["status"]) == (
        320, 300, 2, 180_000, "estimated", 200)
    assert "message_delta" in record["note"]
    assert tw.available(account) == TEN_USD - 180_000
    books_clean(tw)


def test_an_error_event_mid_stream_is_passed_through(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.anthropic = AnthropicScript(error_event=True)
    with pytest.raises(anthropic.APIStatusError) as failure:
        with claude(tw, key).messages.stream(model="claude-test", max_tokens=100,
                                             messages=HELLO) as stream:
            for _ in stream:
                pass
    assert "overloaded_error" in str(failure.value)
    # the upstream still reported usage: 20 × 3 + 4 × 15 = 120 per 1M = 120_000 nano
    assert only_record(tw)["cost_nano"] == 120_000
    books_clean(tw)


# --------------------------------------------------------------------------- errors


def test_errors_come_in_anthropics_shape_with_tollways_code(tw: Tollway) -> None:
    account = tw.account(usd="0.000001")
    key = tw.key(account)
    with pytest.raises(anthropic.AuthenticationError) as bad_key:
        claude(tw, "tw-not-a-key").messages.create(model="claude-test", max_tokens=10,
                                                   messages=HELLO)
    body = bad_key.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["request_id"] == bad_key.value.response.headers["x-request-id"]

    with pytest.raises(anthropic.NotFoundError):
        claude(tw, key).messages.create(model="no-such-model", max_tokens=10, messages=HELLO)
    with pytest.raises(anthropic.NotFoundError) as wrong_route:  # chat-only model
        claude(tw, key).messages.create(model="gpt-test", max_tokens=10, messages=HELLO)
    assert "/v1/messages" in str(wrong_route.value)
    missing = tw.http().post("/v1/messages", headers={"x-api-key": key},
                             json={"model": "claude-test", "messages": HELLO})
    assert missing.status_code == 400
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.json()["error"]["message"]
    # 1 output token already costs more than the balance: 402, Anthropic's billing_error
    with pytest.raises(anthropic.APIStatusError) as broke:
        claude(tw, key).messages.create(model="claude-test", max_tokens=100, messages=HELLO)
    assert broke.value.status_code == 402
    assert broke.value.body["error"]["code"] == "insufficient_balance"  # type: ignore[index]
    assert tw.fake.llm_requests() == []
    assert tw.records() == []


def test_upstream_failure_charges_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.anthropic = AnthropicScript(status=529)
    with pytest.raises(anthropic.APIStatusError) as failure:
        claude(tw, key).messages.create(model="claude-test", max_tokens=10, messages=HELLO)
    assert failure.value.status_code == 502
    assert failure.value.body["error"]["code"] == "upstream_error"  # type: ignore[index]
    # a 4xx is the client's: the upstream's own body comes back
    tw.fake.anthropic = AnthropicScript(status=400, error_body={
        "type": "error", "error": {"type": "invalid_request_error", "message": "bad role"}})
    with pytest.raises(anthropic.BadRequestError) as bad:
        claude(tw, key).messages.create(model="claude-test", max_tokens=10, messages=HELLO)
    assert bad.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": "bad role"}}
    assert [(r["type"], r["cost_nano"]) for r in tw.records()] == [("error", 0), ("error", 0)]
    assert tw.available(account) == TEN_USD
    books_clean(tw)


def test_bearer_and_x_api_key_both_authenticate(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    by_bearer = claude(tw, None, auth_token=key)  # Authorization: Bearer, no x-api-key
    by_bearer.messages.create(model="claude-test", max_tokens=10, messages=HELLO)
    plain = httpx.post(tw.url + "/v1/messages", headers={"x-api-key": key}, json={
        "model": "claude-test", "max_tokens": 10, "messages": HELLO}, timeout=20)
    assert plain.status_code == 200
    assert len(tw.records()) == 2


def test_max_tokens_lowered_to_what_the_balance_affords(tw: Tollway) -> None:
    # The hold prices the prompt estimate at the highest input-side price (the 1-hour write,
    # 6) and each output token at 15. "hello there" is 11 bytes → 4 tokens estimated, plus
    # 3 framing for one message and 3 for the reply = 10 tokens: 10 × 6 = 60 per 1M.
    # 0.00021 USD affords (210 − 60) / 15 = 10 output tokens, not the 100 asked for.
    account = tw.account(nano=210_000)
    key = tw.key(account)
    tw.fake.anthropic = AnthropicScript(input_tokens=10, output_tokens=4)
    raw = claude(tw, key).messages.with_raw_response.create(
        model="claude-test", max_tokens=100, messages=HELLO)
    assert raw.headers["x-tollway-max-tokens"] == "10"
    assert tw.fake.llm_requests()[0].json()["max_tokens"] == 10
    # 10 × 3 + 4 × 15 = 90 per 1M = 90_000 nano
    assert only_record(tw)["cost_nano"] == 90_000
    assert tw.balance(account) == (210_000 - 90_000, 0)
    books_clean(tw)


def test_a_retried_stream_with_an_idempotency_key_is_replayed_not_recharged(
        tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    body = {"model": "claude-test", "max_tokens": 50, "messages": HELLO, "stream": True}
    headers = {"x-api-key": key, "Idempotency-Key": "retry-1"}
    first = tw.http().post("/v1/messages", headers=headers, json=body)
    again = tw.http().post("/v1/messages", headers=headers, json=body)
    assert first.status_code == again.status_code == 200
    # the same events; the cost comment says it is a replay, not charged again
    assert first.content.endswith(b": tollway cost_usd=0.000120000\n\n")
    assert again.content == first.content.replace(b"cost_usd=0.000120000",
                                                  b"cost_usd=0.000120000 replayed=true")
    assert again.headers["x-tollway-replayed-request-id"] == first.headers["x-request-id"]
    assert again.headers["x-tollway-replayed"] == "true"
    # one charge: 20 × 3 + 4 × 15 = 120 per 1M = 120_000 nano
    assert [r["cost_nano"] for r in tw.records()] == [120_000]
    assert len(tw.fake.llm_requests()) == 1
    books_clean(tw)
