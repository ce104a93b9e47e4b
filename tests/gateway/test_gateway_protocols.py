"""``POST /v1/responses`` and ``POST /v1/images/generations`` end to end: the official
``openai`` package → Tollway under uvicorn → fake upstreams on 127.0.0.1, on SQLite and
PostgreSQL.

``reasoner-test`` prices (USD per 1M tokens): input 1.10, output 4.40, cache read 0.55.
``image-test``: 0.04 per image, or per size 1024x1024 0.04 and 1792x1024 0.08; its ratio for
the ``half`` group is overridden to 0.33333333, so a charge has more than 9 decimals and the
one rounding (half-up, per request, not per image) shows. Charges are worked out by hand.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from fakes import (
    IGNORE_TOKENIZER_WARNING,
    UPSTREAM_KEY,
    USD,
    ImagesScript,
    ResponsesScript,
    Tollway,
    error_of,
)
from tollway import tokens

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

TEN_USD = 10 * USD


def books_clean(tw: Tollway) -> None:
    assert tw.open_holds() == 0
    assert tw.verify() == []


def pricing(tw: Tollway, key: str, request_id: str) -> dict[str, Any]:
    response = tw.http().get(f"/v1/billing/usage/{request_id}",
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return dict(response.json()["pricing"])


# --------------------------------------------------------------------------- responses


def test_responses_bill_cached_and_reasoning_tokens_exactly(tw: Tollway) -> None:
    account = tw.account(group="vip")
    key = tw.key(account)
    tw.fake.responses = ResponsesScript(input_tokens=2000, cached_tokens=1500,
                                        output_tokens=300, reasoning_tokens=200)
    raw = tw.client(key).responses.with_raw_response.create(
        model="reasoner-test", input="hello there", max_output_tokens=500)
    answer = raw.parse()
    assert answer.output_text == "Responses say hi"
    # input 2000 INCLUDES 1500 cached; output 300 INCLUDES 200 reasoning:
    # 500 × 1.10 + 1500 × 0.55 + 300 × 4.40 = 550 + 825 + 1320 = 2695 per 1M
    # = 0.002695 USD × 0.8 (vip) = 0.002156 USD = 2_156_000 nano-USD
    assert raw.headers["x-tollway-cost-usd"] == "0.002156000"
    (record,) = tw.records()
    assert {k: record[k] for k in ("route", "input_tokens", "cached_input_tokens",
                                   "output_tokens", "reasoning_tokens", "cost_nano",
                                   "usage_source")} == {
        "route": "/v1/responses", "input_tokens": 2000, "cached_input_tokens": 1500,
        "output_tokens": 300, "reasoning_tokens": 200, "cost_nano": 2_156_000,
        "usage_source": "upstream"}
    assert pricing(tw, key, record["request_id"]) == {
        "billing_type": "token", "price_version": record["price_version_id"],
        "ratio": "0.8", "ratio_source": "group", "unit": "per 1M tokens",
        "components": [
            {"name": "input", "quantity": 500, "unit_price_usd": "1.1",
             "amount_usd": "0.00055"},
            {"name": "cache_read", "quantity": 1500, "unit_price_usd": "0.55",
             "amount_usd": "0.000825"},
            {"name": "cache_write", "quantity": 0, "unit_price_usd": "1.1",
             "amount_usd": "0"},
            {"name": "cache_write_1h", "quantity": 0, "unit_price_usd": "1.1",
             "amount_usd": "0"},
            {"name": "output", "quantity": 300, "unit_price_usd": "4.4",
             "amount_usd": "0.00132"}],
        "exact_usd": "0.002156", "rounded_usd": "0.002156000",
        "formula": "((2000 − 1500 − 0 − 0) × 1.1 + 1500 × 0.55 + 0 × 1.1 + 0 × 1.1 + "
                   "300 × 4.4) / 1000000 × 0.8 = 0.002156 → 0.002156000 USD",
        "charged": True}
    (forwarded,) = tw.fake.llm_requests()
    assert (forwarded.path, forwarded.json()) == ("/v1/responses", {
        "model": "reasoner-test", "input": "hello there", "max_output_tokens": 500})
    assert forwarded.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert tw.available(account) == TEN_USD - 2_156_000
    books_clean(tw)


def test_responses_stream_passes_events_through_and_bills_response_completed(
        tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.responses = ResponsesScript(input_tokens=1234, cached_tokens=1024,
                                        output_tokens=1500, reasoning_tokens=1200)
    events = list(tw.client(key).responses.create(model="reasoner-test", input="hi",
                                                   stream=True))
    sent = [line[7:] for line in tw.fake.streamed[-1].decode().splitlines()
            if line.startswith("event: ")]
    assert [event.type for event in events] == sent
    assert sent[-1] == "response.completed"
    # 210 × 1.10 + 1024 × 0.55 + 1500 × 4.40 = 231 + 563.2 + 6600 = 7394.2 per 1M
    # = 7_394_200 nano-USD
    (record,) = tw.records()
    assert (record["stream"], record["input_tokens"], record["cached_input_tokens"],
            record["output_tokens"], record["reasoning_tokens"], record["cost_nano"]) == (
        True, 1234, 1024, 1500, 1200, 7_394_200)

    # byte for byte: the upstream's events, then the cost as an SSE comment
    with tw.http().stream("POST", "/v1/responses", headers={"Authorization": f"Bearer {key}"},
                          json={"model": "reasoner-test", "input": "hi",
                                "stream": True}) as response:
        body = response.read()
    assert body == tw.fake.streamed[-1] + b": tollway cost_usd=0.007394200\n\n"
    assert tw.available(account) == TEN_USD - 2 * 7_394_200
    books_clean(tw)


def test_responses_stream_cut_before_response_completed_is_estimated(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    # the connection drops after 2 of the 3 text deltas ("Responses", " say"): no usage
    tw.fake.responses = ResponsesScript(cut_after=2)
    with pytest.raises(openai.APIError):
        for _ in tw.client(key).responses.create(model="reasoner-test", input="hi",
                                                 stream=True):
            pass
    # counted locally: prompt "hi" = 1 token, delivered "Responses say" = 2 tokens
    assert (tokens.count("hi"), tokens.count("Responses say")) == (1, 2)
    # 1 × 1.10 + 2 × 4.40 = 9.9 per 1M = 9_900 nano-USD
    records = tw.wait_records(1)
    assert [(r["input_tokens"], r["output_tokens"], r["cost_nano"], r["usage_source"])
            for r in records] == [(1, 2, 9_900, "estimated")]
    assert tw.available(account) == TEN_USD - 9_900
    books_clean(tw)


# --------------------------------------------------------------------------- images


def test_images_bill_each_image_returned_rounded_once(tw: Tollway) -> None:
    account = tw.account(group="half")
    key = tw.key(account)
    raw = tw.client(key).images.with_raw_response.generate(model="image-test",
                                                           prompt="a cat", n=3)
    assert len(raw.parse().data or []) == 3
    # 3 images × 0.04 × 0.33333333 = 0.0399999996 USD → one half-up rounding: 0.040000000
    # (rounding each image first would give 3 × 0.013333333 = 0.039999999)
    assert raw.headers["x-tollway-cost-usd"] == "0.040000000"
    # 1792x1024: 3 × 0.08 × 0.33333333 = 0.0799999992 → 0.079999999
    tw.client(key).images.generate(model="image-test", prompt="a cat", n=3,
                                   size="1792x1024")
    first, wide = tw.records()
    assert (first["calls"], first["per_call_nano"], first["cost_nano"], first["ratio"],
            first["ratio_source"], first["route"]) == (
        3, 40_000_000, 40_000_000, "0.33333333", "model", "/v1/images/generations")
    assert (wide["calls"], wide["per_call_nano"], wide["cost_nano"]) == (
        3, 80_000_000, 79_999_999)
    assert pricing(tw, key, first["request_id"]) == {
        "billing_type": "per_call", "price_version": first["price_version_id"],
        "ratio": "0.33333333", "ratio_source": "model", "unit": "per image",
        "components": [{"name": "calls", "quantity": 3, "unit_price_usd": "0.04",
                        "amount_usd": "0.12"}],
        "exact_usd": "0.0399999996", "rounded_usd": "0.040000000",
        "formula": "3 image × 0.04 × 0.33333333 = 0.0399999996 → 0.040000000 USD",
        "charged": True}
    forwarded = tw.fake.llm_requests()[0]
    assert forwarded.json() == {"model": "image-upstream", "prompt": "a cat", "n": 3}
    assert tw.available(account) == TEN_USD - 40_000_000 - 79_999_999
    books_clean(tw)


def test_fewer_images_than_requested_are_charged_as_returned(tw: Tollway) -> None:
    account = tw.account(group="half")
    key = tw.key(account)
    tw.fake.images = ImagesScript(returned=2)
    raw = tw.client(key).images.with_raw_response.generate(model="image-test",
                                                           prompt="two cats", n=3)
    # 2 × 0.04 × 0.33333333 = 0.0266666664 → 0.026666666
    assert raw.headers["x-tollway-cost-usd"] == "0.026666666"
    (record,) = tw.records()
    assert (record["calls"], record["cost_nano"], record["note"]) == (
        2, 26_666_666, "2 of 3 images returned")
    assert tw.available(account) == TEN_USD - 26_666_666
    books_clean(tw)


def test_a_failed_image_request_is_charged_nothing(tw: Tollway) -> None:
    account = tw.account(group="half")
    key = tw.key(account)
    tw.fake.images = ImagesScript(status=500)
    with pytest.raises(openai.APIStatusError) as failure:
        tw.client(key).images.generate(model="image-test", prompt="a cat", n=3)
    assert failure.value.status_code == 502
    assert error_of(failure.value.response)["code"] == "upstream_error"
    (record,) = tw.records()
    assert (record["type"], record["cost_nano"]) == ("error", 0)
    assert tw.balance(account) == (TEN_USD, 0)

    # a size the model does not price is refused before anything is forwarded
    tw.fake.reset()
    with pytest.raises(openai.BadRequestError) as bad:
        tw.client(key).images.generate(model="image-test", prompt="a cat",
                                       size="256x256")  # type: ignore[arg-type]
    assert "1024x1024, 1792x1024" in str(bad.value)
    # a token model is not an image model, and an image model does not chat
    with pytest.raises(openai.NotFoundError):
        tw.client(key).images.generate(model="gpt-test", prompt="a cat")
    with pytest.raises(openai.NotFoundError):
        tw.client(key).chat.completions.create(model="image-test", messages=[
            {"role": "user", "content": "hi"}])
    assert tw.fake.llm_requests() == []
    books_clean(tw)


def test_image_hold_covers_the_images_requested(tw: Tollway) -> None:
    # 0.10 USD affords 2 images at 0.04 but not 3 (0.12): refused, nothing forwarded
    account = tw.account(usd="0.10")
    key = tw.key(account)
    with pytest.raises(openai.APIStatusError) as refused:
        tw.client(key).images.generate(model="image-test", prompt="a cat", n=3)
    assert refused.value.status_code == 402
    tw.client(key).images.generate(model="image-test", prompt="a cat", n=2)
    assert tw.available(account) == 100_000_000 - 80_000_000
    books_clean(tw)
