"""Every token billed, never more than the model could take: usage bounds, stateful Responses,
server-side tool fees, holds that cover what will be billed, and image prices by quality, on
SQLite and PostgreSQL.

Prices (USD per 1M tokens, per call or per image) of the models this module adds:
``stateful-test`` input 2, output 8, ``web_search`` 0.01 a call, ``max_output_tokens`` 500,
``context_window`` 50,000; ``claude-tools`` (the Anthropic upstream) input 3, output 15,
``web_search`` 0.01 a call; ``image-quality`` per image 0.04, sizes 1024x1024 0.04 and
1536x1024 0.06, qualities ``high`` 0.17 (every size) and ``low`` 0.011 at 1024x1024, 0.016 at
1536x1024. ``gpt-test`` (the shared fake catalog): input 0.15, output 0.60, at most 1,000
output tokens. The ``vip`` group's ratio is 0.8.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from fakes import (
    IGNORE_TOKENIZER_WARNING,
    USD,
    Serving,
    Tollway,
    error_of,
    fake_catalog,
)
from tollway.clock import now_ms
from tollway.gateway.asgi import json_object
from tollway.store import responses as response_store

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

MODELS = """  - id: stateful-test
    provider: fakeai
    price: {input: "2", output: "8", tool_calls: {web_search: "0.01"}}
    max_output_tokens: 500
    context_window: 50000
  - id: claude-tools
    provider: claude
    price: {input: "3", output: "15", tool_calls: {web_search: "0.01"}}
    max_output_tokens: 1000
  - id: image-quality
    provider: fakeai
    price:
      per_call: "0.04"
      per_size: {"1024x1024": "0.04", "1536x1024": "0.06"}
      per_quality: {high: "0.17", low: {"1024x1024": "0.011", "1536x1024": "0.016"}}
"""


@pytest.fixture(scope="module")
def serving(upstream: Any) -> Serving:
    return Serving(catalog=fake_catalog(upstream).replace("models:\n", "models:\n" + MODELS, 1))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def respond(tw: Tollway, key: str, **body: Any) -> httpx.Response:
    return tw.http().post("/v1/responses", headers=bearer(key),
                          json={"model": "stateful-test", "input": "hi", **body})


def record_of(tw: Tollway, response: httpx.Response) -> dict[str, Any]:
    rid = response.headers["x-request-id"]
    (record,) = [r for r in tw.records() if r["request_id"] == rid]
    return record


def upstream_body(tw: Tollway) -> dict[str, Any]:
    return json_object(tw.fake.llm_requests()[-1].body)


# --------------------------------------------------------------------------- usage bounds


def test_stateful_usage_is_billed_in_full_and_tied_to_its_account(tw: Tollway) -> None:
    alice = tw.account(usd="1")
    key = tw.key(alice)
    # a first Response: 30 input, 3 output: (30 × 2 + 3 × 8) / 1e6 = 84e-6 USD
    tw.fake.responses.response_id = "resp_alice_1"
    first = respond(tw, key)
    assert first.status_code == 200, first.text
    assert first.headers["x-tollway-cost-usd"] == "0.000084000"
    # continuing it: the upstream reports 20,000 input tokens for the prompt "hi" (the history
    # lives upstream): billed as reported, (20000 × 2 + 3 × 8) / 1e6 = 0.040024 USD
    tw.fake.responses.response_id, tw.fake.responses.input_tokens = "resp_alice_2", 20_000
    second = respond(tw, key, previous_response_id="resp_alice_1")
    assert second.status_code == 200, second.text
    assert second.headers["x-tollway-cost-usd"] == "0.040024000"
    record = record_of(tw, second)
    assert (record["input_tokens"], record["output_tokens"], record["cost_nano"],
            record["usage_source"], record["note"]) == (20_000, 3, 40_024_000, "upstream", None)
    # streamed the same way
    tw.fake.responses.response_id = "resp_alice_3"
    streamed = respond(tw, key, previous_response_id="resp_alice_2", stream=True)
    assert streamed.content.endswith(b": tollway cost_usd=0.040024000\n\n")
    assert tw.available(alice) == USD - 84_000 - 2 * 40_024_000

    # another account cannot continue Alice's response: 404 in the documented shape, nothing
    # forwarded, held or charged
    bob = tw.account(usd="1")
    bob_key = tw.key(bob)
    forwarded = len(tw.fake.llm_requests())
    for name, value in (("previous_response_id", "resp_alice_1"),
                        ("previous_response_id", "resp_alice_3")):
        refused = respond(tw, bob_key, **{name: value})
        assert refused.status_code == 404, refused.text
        error = error_of(refused)
        assert (error["code"], error["param"]) == ("unknown_response", name)
        assert error["request_id"] == refused.headers["x-request-id"]
    assert len(tw.fake.llm_requests()) == forwarded
    assert tw.balance(bob) == (USD, 0)
    assert [r for r in tw.records() if r["account_id"] == bob] == []
    assert tw.open_holds() == 0 and tw.verify() == []
    # remembered as long as their usage: `tollway usage prune` forgets them with it
    with tw.db.read() as conn:
        assert response_store.recall(conn, "resp_alice_3") == (alice, 20_003)
    with tw.db.write() as conn:
        assert response_store.forget_before(conn, before_ms=now_ms() + 1) >= 3
    with tw.db.read() as conn:
        assert response_store.recall(conn, "resp_alice_3") is None


def test_the_hold_of_a_continued_response_covers_its_history(tw: Tollway) -> None:
    # 0.1 USD; the first Response reports 40,000 input, 3 output:
    # (40000 × 2 + 3 × 8) / 1e6 = 0.080024 USD, leaving 0.019976
    carol = tw.account(usd="0.1")
    key = tw.key(carol)
    tw.fake.responses.response_id, tw.fake.responses.input_tokens = "resp_carol_1", 40_000
    assert respond(tw, key).headers["x-tollway-cost-usd"] == "0.080024000"
    # a new conversation would hold about (1 + 500 × 4) tokens' worth, 0.004 USD: allowed
    tw.fake.responses.response_id, tw.fake.responses.input_tokens = "resp_carol_2", 30
    assert respond(tw, key, max_output_tokens=10).status_code == 200
    # continuing the first holds its 40,003 remembered tokens at 2 USD / 1M (0.080006 USD)
    # plus the new input: more than is left, so 402 and nothing forwarded
    forwarded = len(tw.fake.llm_requests())
    refused = respond(tw, key, previous_response_id="resp_carol_1", max_output_tokens=10)
    assert refused.status_code == 402, refused.text
    assert error_of(refused)["code"] == "insufficient_balance"
    assert len(tw.fake.llm_requests()) == forwarded
    assert tw.open_holds() == 0 and tw.verify() == []


def test_input_beyond_the_context_window_is_capped_and_flagged(tw: Tollway) -> None:
    account = tw.account(usd="1")
    key = tw.key(account)
    # 60,000 reported input on a model whose context window is 50,000: billed 50,000,
    # (50000 × 2 + 3 × 8) / 1e6 = 0.100024 USD, and flagged for review
    tw.fake.responses.input_tokens = 60_000
    response = respond(tw, key)
    assert response.headers["x-tollway-cost-usd"] == "0.100024000"
    record = record_of(tw, response)
    assert (record["input_tokens"], record["usage_source"], record["note"]) == (
        50_000, "capped", "usage capped for review: prompt_tokens 60000 capped at 50000")
    # exactly the window: billed as reported, (50000 × 2 + 3 × 8) / 1e6 again
    tw.fake.responses.input_tokens = 50_000
    response = respond(tw, key)
    assert response.headers["x-tollway-cost-usd"] == "0.100024000"
    assert record_of(tw, response)["usage_source"] == "upstream"
    # the window is shown with the model
    models = {m["id"]: m for m in tw.http().get("/v1/models", headers=bearer(key)).json()["data"]}
    assert (models["stateful-test"]["context_window"], models["gpt-test"]["context_window"],
            models["claude-tools"]["context_window"]) == (50_000, 128_000, 2_000_000)
    assert "context_window" not in models["image-quality"]
    market = {i["id"]: i for i in tw.http().get("/v1/marketplace").json()["data"]}
    assert market["stateful-test"]["context_window"] == 50_000


# --------------------------------------------------------------------------- tool fees


def test_an_anthropic_stream_with_web_search_bills_tokens_and_tool_calls(tw: Tollway) -> None:
    account = tw.account(usd="1", group="vip")
    key = tw.key(account)
    tw.fake.anthropic.input_tokens = 9_000
    tw.fake.anthropic.server_tool_use = {"web_search_requests": 3}
    # ((9000 × 3 + 4 × 15) / 1e6 + 3 × 0.01) × 0.8 = (0.02706 + 0.03) × 0.8 = 0.045648 USD
    response = tw.http().post("/v1/messages", headers={"x-api-key": key}, json={
        "model": "claude-tools", "max_tokens": 50, "stream": True,
        "messages": [{"role": "user", "content": "news?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}]})
    assert response.status_code == 200, response.text
    assert response.content.endswith(b": tollway cost_usd=0.045648000\n\n")
    record = record_of(tw, response)
    assert (record["input_tokens"], record["output_tokens"], record["cost_nano"]) == (
        9_000, 4, 45_648_000)
    assert json.loads(record["tool_calls"]) == {
        "web_search": {"calls": 3, "nano_per_call": 10_000_000}}
    # itemised in the customer's record and its pricing explanation
    (view,) = [r for r in tw.http().get("/v1/billing/usage", headers=bearer(key)).json()["data"]
               if r["request_id"] == record["request_id"]]
    assert view["tool_calls"] == {"web_search": {"calls": 3, "price_per_call_usd": "0.010000000"}}
    pricing = view["pricing"]
    assert {"name": "tool:web_search", "quantity": 3, "unit_price_usd": "0.01",
            "amount_usd": "0.03"} in pricing["components"]
    assert pricing["formula"].endswith(
        " + 3 × 0.01 [web_search]) × 0.8 = 0.045648 → 0.045648000 USD")
    # the same usage in a whole message
    response = tw.http().post("/v1/messages", headers={"x-api-key": key}, json={
        "model": "claude-tools", "max_tokens": 50,
        "messages": [{"role": "user", "content": "news?"}]})
    assert response.headers["x-tollway-cost-usd"] == "0.045648000"
    assert tw.available(account) == USD - 2 * 45_648_000
    assert tw.verify() == []


def test_hosted_tool_calls_in_a_response_are_billed_per_call(tw: Tollway) -> None:
    account = tw.account(usd="1")
    key = tw.key(account)
    tw.fake.responses.tool_items = [
        {"type": "web_search_call", "id": f"ws_{i}", "status": "completed",
         "action": {"type": "search", "query": "news"}} for i in range(2)] + [
        {"type": "file_search_call", "id": "fs_1", "status": "completed", "queries": ["x"]}]
    # two web searches at 0.01; file_search has no price here, so it is recorded, not billed:
    # (30 × 2 + 3 × 8) / 1e6 + 2 × 0.01 = 0.020084 USD
    for stream in (False, True):
        response = respond(tw, key, stream=stream)
        assert response.status_code == 200, response.text
        if stream:
            assert response.content.endswith(b": tollway cost_usd=0.020084000\n\n")
        else:
            assert response.headers["x-tollway-cost-usd"] == "0.020084000"
        assert json.loads(record_of(tw, response)["tool_calls"]) == {
            "file_search": {"calls": 1, "nano_per_call": None},
            "web_search": {"calls": 2, "nano_per_call": 10_000_000}}
    assert tw.available(account) == USD - 2 * 20_084_000
    # and a model without tool prices bills the tokens only: (30 × 0.15 + 3 × 0.60) / 1e6
    response = respond(tw, key, model="gpt-test")
    assert response.headers["x-tollway-cost-usd"] == "0.000006300"


# --------------------------------------------------------------------------- holds


def test_a_completions_batch_holds_for_every_prompt_and_choice(tw: Tollway) -> None:
    # 3 prompts × n 2 = 6 completions of up to max_tokens 100. The prompt estimate is 1 token
    # (3 bytes); a hold of k tokens a choice is (1 × 0.15 + 6k × 0.60) / 1e6 USD
    # = 150 + 3600k nano-USD. 180,150 nano-USD affords k = 50: max_tokens is lowered to 50.
    account = tw.account(nano=180_150)
    key = tw.key(account)
    response = tw.http().post("/v1/completions", headers=bearer(key), json={
        "model": "gpt-test", "prompt": ["a", "b", "c"], "n": 2, "max_tokens": 100})
    assert response.status_code == 200, response.text
    assert response.headers["x-tollway-max-tokens"] == "50"
    assert upstream_body(tw)["max_tokens"] == 50
    assert tw.open_holds() == 0 and tw.verify() == []


def test_max_tokens_above_the_models_maximum_is_lowered_before_the_hold(tw: Tollway) -> None:
    account = tw.account(usd="1")
    key = tw.key(account)
    response = tw.http().post("/v1/chat/completions", headers=bearer(key), json={
        "model": "gpt-test", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 50_000})
    assert response.status_code == 200, response.text
    assert response.headers["x-tollway-max-tokens"] == "1000"
    assert upstream_body(tw)["max_tokens"] == 1000
    # an account that could not hold 50,000 output tokens (0.03 USD) holds 1,000 (0.0006)
    poor = tw.key(tw.account(usd="0.001"))
    response = tw.http().post("/v1/responses", headers=bearer(poor), json={
        "model": "gpt-test", "input": "hi", "max_output_tokens": 50_000})
    assert response.status_code == 200, response.text
    assert upstream_body(tw)["max_output_tokens"] == 1000


def test_the_prompt_estimate_counts_files_audio_and_images_by_size(tw: Tollway) -> None:
    from tollway import tokens

    png = ("data:image/png;base64," + __import__("base64").b64encode(
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + (2000).to_bytes(4, "big")
        + (1000).to_bytes(4, "big") + b"\x08\x02\x00\x00\x00").decode())
    # 2000 x 1000: OpenAI fits 2000 x 1000 into 768 on the short side (1536 x 768: 3 x 2
    # tiles, 85 + 170 × 6 = 1105); Anthropic scales to 1568 x 784: 1229312 / 750 → 1640
    assert tokens.image_tokens(png) == 1640
    payload = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "abc"},
        {"type": "image_url", "image_url": {"url": png}},
        {"type": "input_audio", "input_audio": {"data": "A" * 4000, "format": "wav"}},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64," + "A" * 400}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                                        "data": "A" * 40}}]}]}
    # text 1 + image 1640 + audio 3000 bytes / 1000 = 3 + file 300 / 3 = 100 + document
    # 30 / 3 = 10, and 3 + 3 tokens of framing
    assert tokens.estimate_prompt(payload) == 1 + 1640 + 3 + 100 + 10 + 6


# --------------------------------------------------------------------------- images


def images(tw: Tollway, key: str, **body: Any) -> httpx.Response:
    return tw.http().post("/v1/images/generations", headers=bearer(key),
                          json={"model": "image-quality", "prompt": "a lighthouse", **body})


def test_image_prices_by_quality_and_size(tw: Tollway) -> None:
    account = tw.account(usd="1")
    key = tw.key(account)
    cases = [  # (request, what the answer says, cost of 2 images)
        ({"quality": "low", "size": "1024x1024"}, None, "0.022000000"),   # 2 × 0.011
        ({"quality": "low", "size": "1536x1024"}, None, "0.032000000"),   # 2 × 0.016
        ({"quality": "high", "size": "1536x1024"}, None, "0.340000000"),  # 2 × max(.17, .06)
        ({"size": "1024x1024"}, "low", "0.022000000"),    # billed as the answer's quality
        ({"size": "1024x1024"}, None, "0.340000000"),     # unknown: the dearest, high
    ]
    for body, answered, cost in cases:
        tw.fake.images.quality = answered
        response = images(tw, key, n=2, **body)
        assert response.status_code == 200, (body, response.text)
        assert response.headers["x-tollway-cost-usd"] == cost, body
    # the hold is the dearest applicable price: 0.04 USD affords 2 low images at 1024x1024
    # (0.022) but not 2 of unknown quality (2 × 0.17)
    poor = tw.key(tw.account(usd="0.04"))
    tw.fake.images.quality = "low"
    assert images(tw, poor, n=2, size="1024x1024").status_code == 402
    assert images(tw, poor, n=2, size="1024x1024", quality="low").status_code == 200
    refused = images(tw, key, quality="ultra")
    assert refused.status_code == 400
    assert error_of(refused)["param"] == "quality"
    assert "qualities: high, low" in error_of(refused)["message"]
    assert tw.open_holds() == 0 and tw.verify() == []
