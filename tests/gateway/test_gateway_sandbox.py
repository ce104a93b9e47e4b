"""The built-in sandbox provider, through the gateway, with the demo catalog
(``examples/catalog.yaml``): what ``make serve`` shows on a bare machine, charged as the
formulas say, on SQLite and PostgreSQL.

The sandbox LLM answers "You said: <last user message>" and reports OpenAI-style usage:
prompt = the tokenizer's count of the messages plus OpenAI's framing (3 per message, 3 for
the reply), completion = the reply's tokens (plus 16 reasoning tokens for sandbox-reasoner),
half the prompt cached from 1,024 prompt tokens on. Demo prices (USD per 1M tokens):
sandbox-chat 0.15 / 0.60 / cache read 0.075 (vip override 0.7); sandbox-reasoner
2.50 / 10.00; sandbox-embed 0.02. Calls: web-search 0.002, stock-quote 0.0005,
scholar-search 0.02 USD.
"""

from __future__ import annotations

import asyncio
from decimal import ROUND_HALF_UP
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from fakes import IGNORE_TOKENIZER_WARNING, USD, Serving, Tollway
from tollway import tokens

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)
sqlite_only = pytest.mark.parametrize("served", ["sqlite"], indirect=True)

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
TEN_USD = 10 * USD


@pytest.fixture(scope="module")
def serving() -> Serving:
    return Serving(catalog=CATALOG.read_text())


def test_the_token_counts_these_tests_rely_on() -> None:
    assert tokens.count("hello sandbox") == 2
    assert tokens.count("You said: hello sandbox") == 5
    assert tokens.count("Think about billing") == 3
    assert tokens.count("You said: Think about billing") == 6
    assert tokens.count("some text to embed") == 4
    assert tokens.count("word " * 1100) == 1101


def test_chat_and_its_stream_without_usage(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    messages = [{"role": "user", "content": "hello sandbox"}]
    raw = client.chat.completions.with_raw_response.create(model="sandbox-chat",
                                                           messages=messages)
    completion = raw.parse()
    assert completion.choices[0].message.content == "You said: hello sandbox"
    # prompt 2 + 3 + 3 = 8, completion 5: (8 × 0.15 + 5 × 0.60) / 1e6 = (1.2 + 3) / 1e6
    # = 4_200 nano-USD
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (8, 5)
    assert raw.headers["x-tollway-cost-usd"] == "0.000004200"

    chunks = list(client.chat.completions.create(model="sandbox-chat", messages=messages,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "You said: hello sandbox")
    assert all(c.usage is None for c in chunks)  # not asked for, not shown
    plain, streamed = tw.records()
    assert (plain["cost_nano"], plain["stream"]) == (4_200, False)
    assert (streamed["cost_nano"], streamed["stream"], streamed["usage_source"]) == (
        4_200, True, "upstream")
    assert tw.balance(account) == (TEN_USD - 2 * 4_200, 0)
    assert tw.verify() == []


def test_reasoner_stream_with_usage_async(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)

    async def call() -> list[Any]:
        async with tw.aclient(key) as client:
            stream = await client.chat.completions.create(
                model="sandbox-reasoner", stream=True, stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "Think about billing"}])
            return [chunk async for chunk in stream]

    chunks = asyncio.run(call())
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens_details is not None
    # prompt 3 + 6 = 9; completion 6 visible + 16 reasoning = 22:
    # (9 × 2.50 + 22 × 10.00) / 1e6 = (22.5 + 220) / 1e6 = 242_500 nano-USD
    assert (last.usage.prompt_tokens, last.usage.completion_tokens,
            last.usage.completion_tokens_details.reasoning_tokens) == (9, 22, 16)
    assert (last.model_extra or {})["tollway"]["cost_usd"] == "0.000242500"
    (record,) = tw.records()
    assert (record["input_tokens"], record["output_tokens"], record["reasoning_tokens"],
            record["cost_nano"]) == (9, 22, 16, 242_500)
    assert tw.available(account) == TEN_USD - 242_500


def test_long_prompt_is_half_cached_and_max_tokens_honoured(tw: Tollway) -> None:
    account = tw.account()
    plain = tw.key(account)
    vip = tw.key(account, group="vip")
    messages = [{"role": "user", "content": "word " * 1100}]
    for key in (plain, vip):
        completion = tw.client(key).chat.completions.create(
            model="sandbox-chat", messages=messages, max_tokens=20)
        assert completion.choices[0].finish_reason == "length"
    # prompt 1101 + 6 = 1107, of which 1107 // 2 = 553 cached; completion cut at 20:
    # (554 × 0.15 + 553 × 0.075 + 20 × 0.60) / 1e6 = (83.1 + 41.475 + 12) / 1e6
    # = 136.575e-6 USD = 136_575 nano-USD; vip (override 0.7): 95_602.5 → 95_603.
    first, second = tw.records()
    assert (first["input_tokens"], first["cached_input_tokens"], first["output_tokens"],
            first["cost_nano"]) == (1107, 553, 20, 136_575)
    assert (second["ratio"], second["ratio_source"], second["cost_nano"]) == (
        "0.7", "model", 95_603)
    assert tw.available(account) == TEN_USD - 136_575 - 95_603


def test_embeddings(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    raw = tw.client(key).embeddings.with_raw_response.create(model="sandbox-embed",
                                                            input="some text to embed")
    assert len(raw.parse().data[0].embedding) == 8
    # 4 tokens × 0.02 / 1e6 = 0.08e-6 USD = 80 nano-USD
    assert raw.headers["x-tollway-cost-usd"] == "0.000000080"
    (record,) = tw.records()
    assert (record["input_tokens"], record["output_tokens"], record["cost_nano"]) == (4, 0, 80)


def test_data_apis(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    headers = {"Authorization": f"Bearer {key}"}
    http = tw.http()
    search = http.get("/apis/v1/search/web", params={"q": "tollway"}, headers=headers)
    quote = http.get("/apis/v1/finance/quote/AAPL", headers=headers)
    scholar = http.post("/apis/v1/scholar/search", json={"query": "ledgers"}, headers=headers)
    unknown = http.get("/apis/v1/finance/quote/NOPE12345678", headers=headers)
    no_query = http.get("/apis/v1/search/web", headers=headers)
    assert [r.status_code for r in (search, quote, scholar, unknown, no_query)] == [
        200, 200, 200, 404, 400]
    assert search.json()["query"] == "tollway" and quote.json()["symbol"] == "AAPL"
    assert len(scholar.json()["papers"]) == 2
    # 0.002 + 0.0005 + 0.02 USD for the three 2xx; nothing for the 404 and the 400.
    assert [(r["product"], r["type"], r["cost_nano"]) for r in tw.records()] == [
        ("web-search", "consume", 2_000_000), ("stock-quote", "consume", 500_000),
        ("scholar-search", "consume", 20_000_000), ("stock-quote", "error", 0),
        ("web-search", "error", 0)]
    assert tw.balance(account) == (TEN_USD - 22_500_000, 0)
    assert tw.open_holds() == 0 and tw.verify() == []


@sqlite_only
def test_marketplace_lists_the_demo_catalog(tw: Tollway) -> None:
    key = tw.key(tw.account())
    assert sorted(m.id for m in tw.client(key).models.list()) == [
        "sandbox-chat", "sandbox-claude", "sandbox-embed", "sandbox-image", "sandbox-reasoner"]
    assert tw.http().get("/v1/marketplace").status_code == 200
    # sandbox-embed is sold on /v1/embeddings only (the catalog's `routes`)
    with pytest.raises(openai.NotFoundError) as wrong:
        tw.client(key).chat.completions.create(model="sandbox-embed", messages=[
            {"role": "user", "content": "hi"}])
    assert "served on /v1/embeddings" in str(wrong.value)


# --------------------------------------------------------------------------- other protocols
# sandbox-claude (USD per 1M tokens): input 3, output 15, cache read 0.30, 5-minute cache
# write 3.75, 1-hour cache write 6; sandbox-image 0.04 per image, 0.08 at 1792x1024.

CLAUDE = {"input": D("3"), "read": D("0.30"), "write": D("3.75"), "write_1h": D("6"),
          "output": D("15")}


def claude_cost(record: dict[str, Any]) -> int:
    """The DESIGN formula over the record's own counts, at the demo prices (ratio 1)."""
    uncached = (record["input_tokens"] - record["cached_input_tokens"]
                - record["cache_write_tokens"] - record["cache_write_1h_tokens"])
    usd = (uncached * CLAUDE["input"] + record["cached_input_tokens"] * CLAUDE["read"]
           + record["cache_write_tokens"] * CLAUDE["write"]
           + record["cache_write_1h_tokens"] * CLAUDE["write_1h"]
           + record["output_tokens"] * CLAUDE["output"]) / 1_000_000
    return int((usd * USD).to_integral_value(rounding=ROUND_HALF_UP))


def test_sandbox_messages_report_cache_reads_and_both_cache_writes(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = anthropic.Anthropic(base_url=tw.url, api_key=key, max_retries=0, timeout=20)
    tw._clients.append(client)
    system = [{"type": "text", "text": "word " * 1100, "cache_control": {"type": "ephemeral",
                                                                         "ttl": "1h"}}]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "hello sandbox", "cache_control": {"type": "ephemeral"}}]}]
    message = client.messages.create(model="sandbox-claude", max_tokens=100, system=system,
                                     messages=messages)  # type: ignore[arg-type]
    assert message.content[0].text == "You said: hello sandbox"  # type: ignore[union-attr]
    usage = message.usage
    # prompt = 1101 + 2 + 3 (one message) + 3 (reply) = 1109: half (554) read from the cache,
    # the 1h-marked system block (1101 tokens) capped at the rest (555), nothing left uncached
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens,
            usage.input_tokens, usage.output_tokens) == (554, 555, 0, 5)
    record = tw.records()[0]
    assert (record["input_tokens"], record["cached_input_tokens"], record["cache_write_tokens"],
            record["cache_write_1h_tokens"], record["output_tokens"]) == (1109, 554, 0, 555, 5)
    # 554 × 0.30 + 555 × 6 + 5 × 15 = 166.2 + 3330 + 75 = 3571.2 per 1M = 3_571_200 nano
    assert record["cost_nano"] == claude_cost(record) == 3_571_200

    with client.messages.stream(model="sandbox-claude", max_tokens=100,
                                messages=[{"role": "user", "content": "hello sandbox"}]
                                ) as stream:
        kinds = [event.type for event in stream if event.type != "text"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    streamed = tw.records()[1]
    # prompt 2 + 3 + 3 = 8 uncached, reply 5: 8 × 3 + 5 × 15 = 99 per 1M = 99_000 nano
    assert (streamed["stream"], streamed["input_tokens"], streamed["output_tokens"],
            streamed["cost_nano"], streamed["usage_source"]) == (True, 8, 5, 99_000, "upstream")


def test_sandbox_claude_is_served_on_chat_completions_too(tw: Tollway) -> None:
    key = tw.key(tw.account())
    reply = tw.client(key).chat.completions.create(
        model="sandbox-claude", messages=[{"role": "user", "content": "hello sandbox"}])
    assert reply.choices[0].message.content == "You said: hello sandbox"
    # the same prompt and reply as the streamed message above: 8 in, 5 out, same prices
    assert tw.records()[0]["cost_nano"] == 99_000


def test_sandbox_responses_and_images(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    answer = client.responses.create(model="sandbox-reasoner", input="Think about billing")
    assert answer.output_text == "You said: Think about billing"
    # prompt 3 tokens (no message framing for a string input); output 6 + 16 reasoning
    # 3 × 2.50 + 22 × 10 = 7.5 + 220 = 227.5 per 1M = 227_500 nano
    events = [e.type for e in client.responses.create(model="sandbox-reasoner",
                                                      input="Think about billing",
                                                      stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    images = client.images.generate(model="sandbox-image", prompt="a lighthouse", n=2,
                                    size="1792x1024")
    assert len(images.data or []) == 2
    plain, streamed, image = tw.records()
    assert (plain["input_tokens"], plain["output_tokens"], plain["reasoning_tokens"],
            plain["cost_nano"]) == (3, 22, 16, 227_500)
    assert streamed["cost_nano"] == 227_500 and streamed["stream"] is True
    # 2 images × 0.08 = 0.16 USD
    assert (image["calls"], image["per_call_nano"], image["cost_nano"]) == (
        2, 80_000_000, 160_000_000)
    assert tw.available(account) == TEN_USD - 2 * 227_500 - 160_000_000
    assert tw.open_holds() == 0 and tw.verify() == []
