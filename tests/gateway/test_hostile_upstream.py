"""A hostile upstream: huge bodies, invalid UTF-8, SSE without blank lines, absurd token
counts, usage in the wrong chunk, non-JSON 200s, truncated streams and slow-loris answers, on
SQLite and PostgreSQL.

For every one the gateway answers in the documented error shape (or bills exactly what it
delivered), never crashes, never leaves a hold open, never charges without a usage record,
and bills absurd usage only up to the request's bounds with ``usage_source = "capped"``,
listed by ``GET /admin/v1/usage?review=true``.

Prices (USD per 1M tokens): ``gpt-test`` input 0.15, output 0.60, cache read 0.075;
``claude-test`` input 3, output 15, cache read 0.30, 5-minute write 3.75, 1-hour write 6;
``image-test`` 0.04 USD per image. The local count of the ``HELLO`` prompt is 8 tokens. A
reported prompt is billed as reported up to the model's ``context_window`` (``gpt-test``:
128,000; ``claude-test`` gives none: the default 2,000,000) and capped there, however short the
visible prompt (history and tool results live upstream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
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
    Serving,
    Tollway,
    error_of,
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
CLAUDE = TokenPrice(Decimal("3"), Decimal("15"), Decimal("0.30"), Decimal("3.75"), Decimal("6"))
PRICES = {"gpt-test": GPT, "claude-test": CLAUDE}
IMAGE_NANO = 40_000_000  # image-test: 0.04 USD per image
PIECES = ["Hello", " there", ",", " friend", "!"]  # 5 tokens together
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture(scope="module")
def serving() -> Serving:
    return Serving(env={**GATEWAY_ENV, "TOLLWAY_MAX_UPSTREAM_BODY_BYTES": str(UPSTREAM_LIMIT)})


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
    """The charge the record's own figures imply (default group)."""
    if record["product"] == "image-test":
        return int(record["calls"]) * IMAGE_NANO
    usage = TokenUsage(record["input_tokens"], record["output_tokens"],
                       record["cached_input_tokens"], record["cache_write_tokens"],
                       record["cache_write_1h_tokens"])
    return rate_tokens(usage, PRICES[record["product"]],
                       AppliedRatio(Decimal(1), "group")).cost_nano_usd


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
    # 10^18 and 10^30 tokens: capped at the bounds: prompt at the context window 128,000,
    # output at max_tokens 50:
    # (128000 × 0.15 + 50 × 0.60) / 1e6 = 0.01923 USD = 19_230_000 nano-USD
    for name, count in (("e18", 10**18), ("e30", 10**30)):
        reply({"prompt_tokens": count, "completion_tokens": count,
               "completion_tokens_details": {"reasoning_tokens": count}})
        response = chat(tw, key, max_tokens=50)
        assert response.headers["x-tollway-cost-usd"] == "0.019230000"
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
    assert response.content.endswith(b": tollway cost_usd=0.019230000\n\ndata: [DONE]\n\n")
    ids["stream"] = response.headers["x-request-id"]

    records = {r["request_id"]: r for r in books_hold(tw, account)}
    by_name = {name: records[rid] for name, rid in ids.items()}
    assert {n: (r["usage_source"], r["cost_nano"]) for n, r in by_name.items()} == {
        "plain": ("upstream", 6_000),
        "e18": ("capped", 19_230_000), "e30": ("capped", 19_230_000),
        "stream": ("capped", 19_230_000),
        "negative": ("estimated", 4_200), "cached>prompt": ("estimated", 4_200),
        "float": ("estimated", 4_200), "string": ("estimated", 4_200),
        "not an object": ("estimated", 4_200)}
    capped = by_name["e18"]
    assert (capped["input_tokens"], capped["output_tokens"], capped["reasoning_tokens"]) == (
        128_000, 50, 50)
    assert capped["note"] == (f"usage capped for review: prompt_tokens {10**18} capped at "
                              f"128000; "
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


# --------------------------------------------------------------------------- other protocols


def messages(tw: Tollway, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "claude-test", "max_tokens": 50, "messages": HELLO, **body}
    return tw.http().post("/v1/messages", json=payload, headers={"x-api-key": key})


def responses(tw: Tollway, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-test", "input": "hello there", "max_output_tokens": 50, **body}
    return tw.http().post("/v1/responses", json=payload,
                          headers={"Authorization": f"Bearer {key}"})


def images(tw: Tollway, key: str, **body: Any) -> httpx.Response:
    payload = {"model": "image-test", "prompt": "a lighthouse", **body}
    return tw.http().post("/v1/images/generations", json=payload,
                          headers={"Authorization": f"Bearer {key}"})


def anthropic_error_of(response: httpx.Response) -> dict[str, Any]:
    """The error object of an Anthropic-shaped error answer (``/v1/messages``)."""
    body = response.json()
    assert body["type"] == "error" and body["request_id"] == response.headers["x-request-id"]
    return dict(body["error"])


def named_event(name: str, body: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(body)}\n\n".encode()


CLAUDE_TEXT = ["Hello", " from", " Claude", "."]  # 4 tokens together


def anthropic_stream(start_usage: Any, delta_usage: Any = None, *,
                     pieces: list[str] = CLAUDE_TEXT, end: bool = True) -> list[bytes]:
    """An Anthropic Messages event stream: message_start (with ``start_usage``), text deltas,
    message_delta (with ``delta_usage``, when given) and message_stop (when ``end``)."""
    events = [named_event("message_start", {"type": "message_start", "message": {
        "id": "msg_x", "type": "message", "role": "assistant", "model": "claude-upstream",
        "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
        named_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}})]
    events += [named_event("content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": piece}}) for piece in pieces]
    events.append(named_event("content_block_stop", {"type": "content_block_stop", "index": 0}))
    if delta_usage is not None:
        events.append(named_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": "end_turn"},
            "usage": delta_usage}))
    if end:
        events.append(named_event("message_stop", {"type": "message_stop"}))
    return events


def anthropic_answer(usage: Any) -> bytes:
    return json.dumps({"id": "msg_x", "type": "message", "role": "assistant",
                       "model": "claude-upstream",
                       "content": [{"type": "text", "text": "".join(CLAUDE_TEXT)}],
                       "stop_reason": "end_turn", "usage": usage}).encode()


RESPONSES_TEXT = ["Responses", " say", " hi"]  # 3 tokens together


def responses_answer(usage: Any) -> dict[str, Any]:
    return {"id": "resp_x", "object": "response", "status": "completed",
            "model": "upstream-gpt-4o-mini", "output": [{
                "type": "message", "id": "msg_x", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "".join(RESPONSES_TEXT),
                             "annotations": []}]}], "usage": usage}


def responses_stream(usage: Any) -> list[bytes]:
    events = [named_event("response.output_text.delta", {
        "type": "response.output_text.delta", "item_id": "msg_x", "output_index": 0,
        "content_index": 0, "delta": piece}) for piece in RESPONSES_TEXT]
    events.append(named_event("response.completed", {"type": "response.completed",
                                                     "response": responses_answer(usage)}))
    return events


def test_absurd_anthropic_usage_is_capped_or_estimated_and_flagged(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    ids = {}

    def stream(name: str, events: list[bytes], cost: str) -> None:
        tw.fake.hostile = streaming(*events)
        response = messages(tw, key, stream=True)
        assert response.status_code == 200, response.text
        assert response.content.endswith(f": tollway cost_usd={cost}\n\n".encode()), name
        ids[name] = response.headers["x-request-id"]

    def whole(name: str, usage: Any, cost: str) -> None:
        tw.fake.hostile = replying(anthropic_answer(usage))
        response = messages(tw, key)
        assert response.status_code == 200, response.text
        assert response.headers["x-tollway-cost-usd"] == cost, name
        ids[name] = response.headers["x-request-id"]

    # plausible: input 20, output 4: (20 × 3 + 4 × 15) / 1e6 = 120e-6 USD
    stream("plain", anthropic_stream({"input_tokens": 20, "output_tokens": 1},
                                     {"output_tokens": 4}), "0.000120000")
    # 10^18 output tokens in message_delta: capped at max_tokens 50:
    # (20 × 3 + 50 × 15) / 1e6 = 810e-6 USD
    stream("delta e18", anthropic_stream({"input_tokens": 20, "output_tokens": 1},
                                         {"output_tokens": 10**18}), "0.000810000")
    # message_delta re-reporting 10^18 input and cache reads too: the prompt is capped at the
    # default context window 2,000,000, all of it cache reads:
    # (2000000 × 0.30 + 50 × 15) / 1e6 = 0.60075 USD
    stream("delta all e18", anthropic_stream(
        {"input_tokens": 20, "output_tokens": 1},
        {"input_tokens": 10**18, "cache_read_input_tokens": 10**18,
         "output_tokens": 10**18}), "0.600750000")
    # a whole message with 10^18 cache writes and output: prompt 2,000,000, all 5-minute
    # writes: (2000000 × 3.75 + 50 × 15) / 1e6 = 7.50075 USD
    whole("whole e18", {"input_tokens": 20, "output_tokens": 10**18,
                        "cache_creation_input_tokens": 10**18}, "7.500750000")
    # negative cache tokens (message_start, the 1-hour split, a whole answer) are impossible:
    # estimated from the local count, prompt 8, output 4: (8 × 3 + 4 × 15) / 1e6 = 84e-6 USD
    stream("negative read", anthropic_stream(
        {"input_tokens": 20, "cache_read_input_tokens": -5, "output_tokens": 1},
        {"output_tokens": 4}), "0.000084000")
    stream("negative 1h", anthropic_stream(
        {"input_tokens": 20, "output_tokens": 1, "cache_creation_input_tokens": 3,
         "cache_creation": {"ephemeral_5m_input_tokens": 6,
                            "ephemeral_1h_input_tokens": -3}},
        {"output_tokens": 4}), "0.000084000")
    whole("whole negative", {"input_tokens": 20, "output_tokens": 4,
                             "cache_creation_input_tokens": -1}, "0.000084000")
    whole("whole float", {"input_tokens": 1e18, "output_tokens": 4}, "0.000084000")

    records = {r["request_id"]: r for r in books_hold(tw, account)}
    by_name = {name: records[rid] for name, rid in ids.items()}
    assert {n: (r["usage_source"], r["cost_nano"]) for n, r in by_name.items()} == {
        "plain": ("upstream", 120_000),
        "delta e18": ("capped", 810_000), "delta all e18": ("capped", 600_750_000),
        "whole e18": ("capped", 7_500_750_000),
        "negative read": ("estimated", 84_000), "negative 1h": ("estimated", 84_000),
        "whole negative": ("estimated", 84_000), "whole float": ("estimated", 84_000)}
    capped = by_name["delta all e18"]
    assert (capped["input_tokens"], capped["cached_input_tokens"], capped["output_tokens"]) == (
        2_000_000, 2_000_000, 50)
    assert capped["note"].startswith("usage capped for review: prompt_tokens ")
    assert (by_name["whole e18"]["cache_write_tokens"],
            by_name["whole e18"]["cache_write_1h_tokens"]) == (2_000_000, 0)
    listed = tw.http().get("/admin/v1/usage", params={"review": "true", "account": account},
                           headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["data"]
    assert {r["request_id"] for r in listed} == {
        rid for name, rid in ids.items() if name != "plain"}


def test_absurd_responses_usage_is_capped_or_estimated_and_flagged(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    ids = {}
    # 10^18 output (and reasoning) tokens in a whole answer: output capped at
    # max_output_tokens 50: (20 × 0.15 + 50 × 0.60) / 1e6 = 33e-6 USD
    tw.fake.hostile = replying(json.dumps(responses_answer({
        "input_tokens": 20, "output_tokens": 10**18,
        "output_tokens_details": {"reasoning_tokens": 10**18}})).encode())
    response = responses(tw, key)
    assert response.headers["x-tollway-cost-usd"] == "0.000033000"
    ids["whole e18"] = response.headers["x-request-id"]
    # 10^18 everything in response.completed: prompt capped at the context window 128,000,
    # all cache reads: (128000 × 0.075 + 50 × 0.60) / 1e6 = 9630e-6 USD
    tw.fake.hostile = streaming(*responses_stream({
        "input_tokens": 10**18, "input_tokens_details": {"cached_tokens": 10**18},
        "output_tokens": 10**18}))
    response = responses(tw, key, stream=True)
    assert response.content.endswith(b": tollway cost_usd=0.009630000\n\n")
    ids["stream e18"] = response.headers["x-request-id"]
    # negative cached tokens: estimated, prompt 2, output 3: (2 × 0.15 + 3 × 0.60) / 1e6
    # = 2.1e-6 USD, streamed or not
    usage = {"input_tokens": 20, "input_tokens_details": {"cached_tokens": -1},
             "output_tokens": 3}
    tw.fake.hostile = replying(json.dumps(responses_answer(usage)).encode())
    response = responses(tw, key)
    assert response.headers["x-tollway-cost-usd"] == "0.000002100"
    ids["negative"] = response.headers["x-request-id"]
    tw.fake.hostile = streaming(*responses_stream(usage))
    response = responses(tw, key, stream=True)
    assert response.content.endswith(b": tollway cost_usd=0.000002100\n\n")
    ids["stream negative"] = response.headers["x-request-id"]

    records = {r["request_id"]: r for r in books_hold(tw, account)}
    assert {n: (records[rid]["usage_source"], records[rid]["cost_nano"])
            for n, rid in ids.items()} == {
        "whole e18": ("capped", 33_000), "stream e18": ("capped", 9_630_000),
        "negative": ("estimated", 2_100), "stream negative": ("estimated", 2_100)}
    assert records[ids["whole e18"]]["reasoning_tokens"] == 50


def test_huge_answers_on_every_protocol_are_502s_and_cost_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    huge = b'{"padding": "' + b"x" * UPSTREAM_LIMIT + b'"}'
    tw.fake.hostile = replying(huge, chunked=True)
    for send in (messages, responses, images):
        response = send(tw, key)
        assert response.status_code == 502, (send.__name__, response.text)
        error = (anthropic_error_of(response) if send is messages else error_of(response))
        assert error["code"] == "upstream_error"
        assert f"larger than {UPSTREAM_LIMIT} bytes" in error["message"]
    records = books_hold(tw, account)
    assert [(r["route"], r["type"], r["status"], r["cost_nano"]) for r in records] == [
        ("/v1/messages", "error", 502, 0), ("/v1/responses", "error", 502, 0),
        ("/v1/images/generations", "error", 502, 0)]
    assert tw.available(account) == TEN_USD


def test_a_huge_anthropic_stream_bills_what_was_delivered(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    piece = "hello there " * 80
    events = anthropic_stream({"input_tokens": 20, "output_tokens": 1},
                              pieces=[piece] * (UPSTREAM_LIMIT // len(piece) + 10))
    tw.fake.hostile = streaming(*events)
    response = messages(tw, key, stream=True)
    assert response.status_code == 200
    # cut after message_start: its input (20) as reported, the delivered output counted
    # locally and bounded by max_tokens 50: (20 × 3 + 50 × 15) / 1e6 = 810e-6 USD; the client
    # is told the stream is incomplete (an error event) before the cost
    error, _cost = response.content.split(b"\n\n")[-3:-1]
    assert error.startswith(b"event: error\ndata: ")
    assert json.loads(error.split(b"data: ", 1)[1])["error"]["code"] == "upstream_error"
    assert response.content.endswith(b": tollway cost_usd=0.000810000\n\n")
    (record,) = books_hold(tw, account)
    assert (record["usage_source"], record["input_tokens"], record["output_tokens"],
            record["cost_nano"]) == ("estimated", 20, 50, 810_000)
    assert f"larger than {UPSTREAM_LIMIT} bytes" in record["note"]


def test_sse_without_blank_lines_is_bounded_on_every_protocol(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    endless = b"event: message_start\ndata: {" + b"x" * (MAX_EVENT_BYTES + 1024)
    tw.fake.hostile = streaming(*[endless[i:i + 65536] for i in range(0, len(endless), 65536)])
    # Anthropic's error event and shape
    response = messages(tw, key, stream=True)
    assert response.status_code == 200
    assert response.content.startswith(b"event: error\ndata: ")
    (event,) = sse_events(response.content)
    body = json.loads(event)
    assert (body["type"], body["error"]["code"]) == ("error", "upstream_error")
    assert f"longer than {MAX_EVENT_BYTES} bytes" in body["error"]["message"]
    # the Responses API's error event, with Tollway's error object
    response = responses(tw, key, stream=True)
    (event,) = sse_events(response.content)
    body = json.loads(event)
    assert (body["type"], body["code"], body["error"]["code"]) == (
        "error", "upstream_error", "upstream_error")
    records = books_hold(tw, account)
    assert [(r["route"], r["type"], r["status"], r["cost_nano"]) for r in records] == [
        ("/v1/messages", "error", 502, 0), ("/v1/responses", "error", 502, 0)]


def test_upstream_errors_on_every_protocol_pass_through_marked(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.hostile = replying(b'{"type": "error", "error": {"type": "invalid_request_error"}}',
                               status=400)
    for send in (messages, responses, images):
        response = send(tw, key)
        assert response.status_code == 400, send.__name__
        assert response.headers["x-tollway-upstream-error"] == "true"
        assert response.json()["error"] == {"type": "invalid_request_error"}
    records = books_hold(tw, account)
    assert [(r["type"], r["status"], r["cost_nano"]) for r in records] == [
        ("error", 400, 0)] * 3


def test_texts_past_the_tokenizers_limit_are_still_counted() -> None:
    """Regression: bpe-openai raised ValueError on 1,000,000+ characters, which crashed the
    settlement of a long stream without usage (its hold stayed open until the reaper)."""
    from tollway import tokens

    piece = "hello there " * 10_000  # 120_000 characters
    whole = tokens.count(piece)
    big = tokens.count(piece * 10)  # 1.2M characters: six pieces of 200_000
    assert 10 * whole - 10 <= big <= 10 * whole + 6  # a piece boundary splits at most a token
    assert tokens.count("") == 0
