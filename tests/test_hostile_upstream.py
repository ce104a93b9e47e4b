"""A hostile upstream: huge bodies, invalid UTF-8, SSE without blank lines, absurd token
counts, usage in the wrong chunk, non-JSON 200s, truncated streams and slow-loris answers, on
SQLite and PostgreSQL.

For every one the gateway answers in the documented error shape (or bills exactly what it
delivered), never crashes, never leaves a hold open, never charges without a usage record,
and bills absurd usage only up to the request's bounds with ``usage_source = "capped"``,
listed by ``GET /admin/v1/usage?review=true``.

Prices (USD per 1M tokens): ``gpt-test`` input 0.15, output 0.60. The local count of the
``HELLO`` prompt is 8 tokens; the hold's estimate of it is 10 (see ``test_gateway``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from aiohttp import web

from fakes import (
    ADMIN_TOKEN,
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    USD,
    FakeUpstream,
    Tollway,
    error_of,
    fake_catalog,
    fresh_database,
    running_tollway,
    sse_events,
)
from tollway.cli import main
from tollway.errors import UpstreamError
from tollway.gateway.sse import MAX_EVENT_BYTES, EventSplitter
from tollway.pricing.rating import AppliedRatio, TokenPrice, TokenUsage, rate_tokens

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

TEN_USD = 10 * USD
HELLO = [{"role": "user", "content": "hello there"}]
UPSTREAM_LIMIT = 2 * 1024 * 1024  # TOLLWAY_MAX_UPSTREAM_BODY_BYTES in these tests
GPT = TokenPrice(Decimal("0.15"), Decimal("0.60"), Decimal("0.075"))
PIECES = ["Hello", " there", ",", " friend", "!"]  # 5 tokens together
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, upstream: FakeUpstream) -> Iterator[Tollway]:
    env = {**GATEWAY_ENV, "TOLLWAY_MAX_UPSTREAM_BODY_BYTES": str(UPSTREAM_LIMIT)}
    with fresh_database(request) as db, running_tollway(db, fake_catalog(upstream), upstream,
                                                        env=env) as tollway:
        yield tollway


@pytest.fixture
def tw(served: Tollway) -> Iterator[Tollway]:
    served.begin_test()
    yield served
    served.close_clients()


# --------------------------------------------------------------------------- helpers


def chat(tw: Tollway, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-test", "messages": HELLO, **body}
    return tw.http().post("/v1/chat/completions", json=payload,
                          headers={"Authorization": f"Bearer {key}"})


def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk",
                                   "choices": choices, **extra}).encode() + b"\n\n"


def delta(text: str) -> dict[str, Any]:
    return {"index": 0, "delta": {"content": text}, "finish_reason": None}


def answer(usage: Any, text: str = "Hello there, friend!") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": "stop",
         "message": {"role": "assistant", "content": text}}], "usage": usage}


def streaming(*parts: bytes, then: float = 0.0, abort: bool = False) -> Handler:
    """A handler that streams ``parts`` (raw bytes), then waits ``then`` seconds, then ends
    (or drops the connection)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for part in parts:
                await response.write(part)
            if then:
                await asyncio.sleep(then)
            if abort:
                assert request.transport is not None
                request.transport.abort()
                return response
            await response.write_eof()
        except ConnectionError:
            pass
        return response
    return handler


def replying(body: bytes, *, status: int = 200, content_type: str = "application/json",
            chunked: bool = False) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        if not chunked:
            return web.Response(status=status, body=body, content_type=content_type)
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(body), 65536):
                await response.write(body[start:start + 65536])
            await response.write_eof()
        except ConnectionError:
            pass
        return response
    return handler


def silent_after_headers(seconds: float) -> Handler:
    """Slow loris: the status line and headers, then nothing (longer than the read timeout)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        try:
            await response.write(b"{")
            await asyncio.sleep(seconds)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response
    return handler


def cost_of(record: dict[str, Any]) -> int:
    """The charge the record's own figures imply (gpt-test, default group)."""
    usage = TokenUsage(record["input_tokens"], record["output_tokens"],
                       record["cached_input_tokens"], record["cache_write_tokens"])
    return rate_tokens(usage, GPT, AppliedRatio(Decimal(1), "group")).cost_nano_usd


def books_hold(tw: Tollway, account: int) -> list[dict[str, Any]]:
    """Every charge has its record and matches its figures; no hold is left open; the ledger
    verifies. Returns the records."""
    records = tw.records()
    assert all(r["cost_nano"] == (cost_of(r) if r["type"] == "consume" else 0)
               for r in records), records
    assert tw.balance(account) == (TEN_USD - sum(r["cost_nano"] for r in records), 0)
    assert tw.open_holds() == 0
    assert tw.verify() == []
    return records


def content_stream(*extra: bytes, usage: Any = None) -> list[bytes]:
    parts = [chunk([delta(p)]) for p in PIECES]
    if usage is not None:
        parts.append(chunk([], usage=usage))
    return [*parts, *extra]


DONE = b"data: [DONE]\n\n"


# --------------------------------------------------------------------------- huge answers


def test_a_huge_answer_is_a_502_and_costs_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    huge = b'{"choices": [], "padding": "' + b"x" * UPSTREAM_LIMIT + b'"}'
    for handler in (replying(huge), replying(huge, chunked=True)):
        tw.fake.hostile = handler
        response = chat(tw, key)
        assert response.status_code == 502, response.text
        error = error_of(response)
        assert error["code"] == "upstream_error"
        assert f"larger than {UPSTREAM_LIMIT} bytes" in error["message"]
    # a data API's answer is bounded the same way
    tw.fake.hostile = replying(huge, chunked=True)
    response = tw.http().get("/apis/v1/twitter/user/jack",
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_error"
    records = books_hold(tw, account)
    assert [(r["type"], r["status"], r["cost_nano"]) for r in records] == [
        ("error", 502, 0)] * 3
    assert tw.available(account) == TEN_USD


def test_a_huge_stream_is_cut_and_bills_only_what_was_delivered(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    piece = chunk([delta("a" * 1000)])
    tw.fake.hostile = streaming(*[piece] * (UPSTREAM_LIMIT // len(piece) + 10), DONE)
    response = chat(tw, key, stream=True, max_tokens=10)
    assert response.status_code == 200
    # No usage arrived: the delivered output is counted locally and capped at max_tokens 10;
    # prompt 8 (local count): (8 × 0.15 + 10 × 0.60) / 1e6 = 7.2e-6 USD = 7_200 nano-USD.
    assert response.content.endswith(b": tollway cost_usd=0.000007200\n\n")
    (record,) = books_hold(tw, account)
    assert (record["type"], record["usage_source"], record["input_tokens"],
            record["output_tokens"], record["cost_nano"]) == ("consume", "estimated", 8, 10,
                                                              7_200)
    assert f"larger than {UPSTREAM_LIMIT} bytes" in record["note"]


# --------------------------------------------------------------------------- malformed bytes


def test_invalid_utf8_never_crashes_and_never_charges_blindly(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    # a 2xx whose body is not UTF-8: 502, nothing charged
    tw.fake.hostile = replying(b"\xff\xfe{\"choices\": \xc3\x28}")
    response = chat(tw, key)
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_error"
    # a 4xx whose body is not UTF-8 passes through unchanged, uncharged
    tw.fake.hostile = replying(b"\xff bad \xfe", status=400)
    response = chat(tw, key)
    assert (response.status_code, response.content) == (400, b"\xff bad \xfe")
    # an error body holding NUL characters (PostgreSQL refuses them in a note): 502, no charge
    tw.fake.hostile = replying(b'{"error": "bad\x00 things"}', status=500)
    response = chat(tw, key)
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_error"
        # a stream with one undecodable event: relayed as is; the usage chunk is billed exactly:
    # (20 × 0.15 + 5 × 0.60) / 1e6 = 6e-6 USD = 6_000 nano-USD
    tw.fake.hostile = streaming(b"data: \xff\xfe\xc3\x28\n\n",
                                *content_stream(DONE, usage={"prompt_tokens": 20,
                                                             "completion_tokens": 5}))
    response = chat(tw, key, stream=True)
    assert response.status_code == 200
    assert response.content.endswith(b": tollway cost_usd=0.000006000\n\ndata: [DONE]\n\n")
    records = books_hold(tw, account)
    assert [(r["type"], r["status"], r["cost_nano"], r["usage_source"]) for r in records] == [
        ("error", 502, 0, "none"), ("error", 400, 0, "none"), ("error", 502, 0, "none"),
        ("consume", 200, 6_000, "upstream")]
    assert "bad\ufffd things" in records[2]["note"]


def test_sse_without_blank_lines_is_bounded(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    # one "event" that never ends, longer than MAX_EVENT_BYTES but within the body limit
    endless = b"data: {" + b"x" * (MAX_EVENT_BYTES + 1024)
    assert len(endless) < UPSTREAM_LIMIT
    tw.fake.hostile = streaming(*[endless[i:i + 65536] for i in range(0, len(endless), 65536)])
    response = chat(tw, key, stream=True)
    assert response.status_code == 200  # the stream had started: the error is its last event
    (event,) = sse_events(response.content)
    error = json.loads(event)["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")
    assert f"longer than {MAX_EVENT_BYTES} bytes" in error["message"]
    (record,) = books_hold(tw, account)
    assert (record["type"], record["status"], record["cost_nano"]) == ("error", 502, 0)
    assert record["request_id"] == error["request_id"]


def test_the_event_splitter_keeps_at_most_one_event_of_tail() -> None:
    splitter = EventSplitter(max_event_bytes=10)
    assert splitter.feed(b"data: 1\n\ndata: 2") == [b"data: 1\n\n"]
    assert splitter.feed(b"\r\n\r\n") == [b"data: 2\r\n\r\n"]
    with pytest.raises(UpstreamError, match="longer than 10 bytes"):
        splitter.feed(b"data: 12345")
    assert splitter.rest() == b""


def test_non_json_and_truncated_answers(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    for body in (b"null", b"[1, 2]", b'"text"', b"<html>oops</html>", b""):
        tw.fake.hostile = replying(body)
        response = chat(tw, key)
        assert response.status_code == 502 and error_of(response)["code"] == "upstream_error"
    # a stream of non-JSON events delivers nothing: 502 in the stream, nothing charged
    tw.fake.hostile = streaming(b"data: not json\n\n", b"data: {]\n\n", DONE)
    response = chat(tw, key, stream=True)
    (event,) = [e for e in sse_events(response.content) if e != b"not json" and e != b"{]"]
    assert json.loads(event)["error"]["code"] == "upstream_error"
    # a stream cut in the middle of an event, after "Hello there": estimated from what was
    # delivered: prompt 8, output 2: (8 × 0.15 + 2 × 0.60) / 1e6 = 2.4e-6 USD = 2_400 nano
    tw.fake.hostile = streaming(chunk([delta("Hello")]), chunk([delta(" there")]),
                                b'data: {"choi', abort=True)
    response = chat(tw, key, stream=True)
    assert response.status_code == 200
    records = books_hold(tw, account)
    assert [(r["type"], r["status"], r["cost_nano"]) for r in records] == [
        ("error", 502, 0)] * 6 + [("consume", 200, 2_400)]
    assert (records[-1]["usage_source"], records[-1]["output_tokens"]) == ("estimated", 2)


# --------------------------------------------------------------------------- absurd usage


def test_absurd_usage_is_capped_or_estimated_and_flagged_for_review(
        tw: Tollway, capsys: pytest.CaptureFixture[str]) -> None:
    account = tw.account()
    key = tw.key(account)
    text = "".join(PIECES)

    def reply(usage: Any) -> None:
        tw.fake.hostile = replying(json.dumps(answer(usage, text)).encode())

    ids = {}
    # plausible usage: billed as reported, not for review:
    # (20 × 0.15 + 5 × 0.60) / 1e6 = 6_000 nano-USD
    reply({"prompt_tokens": 20, "completion_tokens": 5})
    ids["plain"] = chat(tw, key, max_tokens=50).headers["x-request-id"]
    # 10^18 and 10^30 tokens: capped at the bounds: prompt max(10 × 4, 10 + 4096) = 4106
    # (10 is the hold's estimate of the prompt), output max_tokens 50:
    # (4106 × 0.15 + 50 × 0.60) / 1e6 = 645.9e-6 USD = 645_900 nano-USD
    for name, count in (("e18", 10**18), ("e30", 10**30)):
        reply({"prompt_tokens": count, "completion_tokens": count,
               "completion_tokens_details": {"reasoning_tokens": count}})
        response = chat(tw, key, max_tokens=50)
        assert response.headers["x-tollway-cost-usd"] == "0.000645900"
        ids[name] = response.headers["x-request-id"]
    # impossible usage: estimated from the local count, prompt 8, output 5:
    # (8 × 0.15 + 5 × 0.60) / 1e6 = 4_200 nano-USD
    for name, usage in (("negative", {"prompt_tokens": -5, "completion_tokens": 3}),
                        ("cached>prompt", {"prompt_tokens": 20, "completion_tokens": 5,
                                           "prompt_tokens_details": {"cached_tokens": 10**18}}),
                        ("float", {"prompt_tokens": 20.0, "completion_tokens": 5}),
                        ("string", {"prompt_tokens": "20", "completion_tokens": 5}),
                        ("not an object", "lots")):
        reply(usage)
        response = chat(tw, key, max_tokens=50)
        assert response.headers["x-tollway-cost-usd"] == "0.000004200", name
        ids[name] = response.headers["x-request-id"]
    # the same absurd usage in a stream's usage chunk
    tw.fake.hostile = streaming(*content_stream(DONE, usage={"prompt_tokens": 10**18,
                                                             "completion_tokens": 10**18}))
    response = chat(tw, key, stream=True, max_tokens=50)
    assert response.content.endswith(b": tollway cost_usd=0.000645900\n\ndata: [DONE]\n\n")
    ids["stream"] = response.headers["x-request-id"]

    records = {r["request_id"]: r for r in books_hold(tw, account)}
    by_name = {name: records[rid] for name, rid in ids.items()}
    assert {n: (r["usage_source"], r["cost_nano"]) for n, r in by_name.items()} == {
        "plain": ("upstream", 6_000),
        "e18": ("capped", 645_900), "e30": ("capped", 645_900), "stream": ("capped", 645_900),
        "negative": ("estimated", 4_200), "cached>prompt": ("estimated", 4_200),
        "float": ("estimated", 4_200), "string": ("estimated", 4_200),
        "not an object": ("estimated", 4_200)}
    capped = by_name["e18"]
    assert (capped["input_tokens"], capped["output_tokens"], capped["reasoning_tokens"]) == (
        4106, 50, 50)
    assert capped["note"] == (f"usage capped for review: prompt_tokens {10**18} capped at 4106; "
                              f"completion_tokens {10**18} capped at 50")
    # the operator's review list: every capped or estimated record, and nothing else
    listed = tw.http().get("/admin/v1/usage", params={"review": "true", "account": account,
                                                      "limit": 100},
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert listed.status_code == 200, listed.text
    assert {r["request_id"] for r in listed.json()["data"]} == {
        rid for name, rid in ids.items() if name != "plain"}
    assert {r["usage_source"] for r in listed.json()["data"]} == {"capped", "estimated"}
    # and the CLI's
    assert main(["usage", str(account), "--review", "--limit", "100", "--json",
                 "--database-url", tw.db.url]) == 0
    out, _ = capsys.readouterr()
    assert {r["request_id"] for r in json.loads(out)["data"]} == {
        rid for name, rid in ids.items() if name != "plain"}


def test_usage_in_the_wrong_chunk(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    usage = {"prompt_tokens": 20, "completion_tokens": 5}
    # usage inside a content chunk rather than a final one: billed from it,
    # (20 × 0.15 + 5 × 0.60) / 1e6 = 6_000 nano-USD
    tw.fake.hostile = streaming(chunk([delta("Hello")], usage=usage),
                                *[chunk([delta(p)]) for p in PIECES[1:]], DONE)
    assert chat(tw, key, stream=True).content.endswith(
        b": tollway cost_usd=0.000006000\n\ndata: [DONE]\n\n")
    # two usage chunks: the last one counts, (30 × 0.15 + 7 × 0.60) / 1e6 = 8_700 nano-USD
    tw.fake.hostile = streaming(*content_stream(usage=usage), chunk([], usage={
        "prompt_tokens": 30, "completion_tokens": 7}), DONE)
    assert chat(tw, key, stream=True).content.endswith(
        b": tollway cost_usd=0.000008700\n\ndata: [DONE]\n\n")
    # usage after [DONE] is never read: estimated, prompt 8, output 5 = 4_200 nano-USD
    tw.fake.hostile = streaming(*content_stream(DONE, chunk([], usage=usage)))
    assert chat(tw, key, stream=True).content.endswith(
        b": tollway cost_usd=0.000004200\n\ndata: [DONE]\n\n")
    records = books_hold(tw, account)
    assert [(r["usage_source"], r["cost_nano"]) for r in records] == [
        ("upstream", 6_000), ("upstream", 8_700), ("estimated", 4_200)]


# --------------------------------------------------------------------------- slow loris


def test_headers_then_silence_is_a_504_within_the_read_timeout(tw: Tollway) -> None:
    """TOLLWAY_UPSTREAM_READ_TIMEOUT_SECONDS=2; the upstream goes quiet for 30 s."""
    account = tw.account()
    key = tw.key(account)
    silent = silent_after_headers(30)

    async def loris(request: web.Request) -> web.StreamResponse:
        if b'"stream": true' in await request.read():
            return await streaming(b": keep-alive\n\n", then=30)(request)
        return await silent(request)

    tw.fake.hostile = loris
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "gpt-test", "messages": HELLO}

    async def all_three() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tw.url, timeout=20, headers=headers) as client:
            return list(await asyncio.gather(
                client.post("/v1/chat/completions", json=body),
                client.post("/v1/chat/completions", json={**body, "stream": True}),
                client.get("/apis/v1/twitter/user/jack")))

    plain, stream, data = asyncio.run(all_three())
    for response in (plain, data):
        assert response.status_code == 504, response.text
        assert error_of(response)["code"] == "upstream_timeout"
    events = [e for e in sse_events(stream.content)]
    assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"
    records = books_hold(tw, account)
    assert sorted((r["type"], r["status"], r["cost_nano"], r["error_code"])
                  for r in records) == [("error", 504, 0, "upstream_timeout")] * 3


def test_texts_past_the_tokenizers_limit_are_still_counted() -> None:
    """Regression: bpe-openai raised ValueError on 1,000,000+ characters, which crashed the
    settlement of a long stream without usage (its hold stayed open until the reaper)."""
    from tollway import tokens

    piece = "hello there " * 10_000  # 120_000 characters
    whole = tokens.count(piece)
    big = tokens.count(piece * 10)  # 1.2M characters: six pieces of 200_000
    assert 10 * whole - 10 <= big <= 10 * whole + 6  # a piece boundary splits at most a token
    assert tokens.count("") == 0
