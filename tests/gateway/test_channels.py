"""Upstream channels end to end (issue 13): the official clients → Tollway under uvicorn →
several fake upstreams on 127.0.0.1 that fail in patterns (refused connections, 500s, 429
with Retry-After, slow headers, a stream cut after its first byte), on SQLite and PostgreSQL.

Prices (USD per 1M tokens) and costs are chosen so every charge is worked out by hand:
``chat-fo`` input 1, output 2 (so 20 prompt + 5 completion tokens = 20 000 + 10 000 =
30 000 nano-USD); its channel ``b`` costs input 0.5, output 1 (15 000 nano-USD for the same
usage), channel ``a`` the model's cost, input 0.8, output 1.6 (24 000).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest
from aiohttp import web

from fakes import (
    ADMIN_TOKEN,
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    UPSTREAM_KEY_ENV,
    USD,
    AnthropicScript,
    DataReply,
    FakeClock,
    FakeUpstream,
    ImagesScript,
    LLMScript,
    ResponsesScript,
    Serving,
    Tollway,
    closed_port,
    fresh_database,
    running_tollway,
)
from tollway import clock

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

TEN_USD = 10 * USD
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def catalog(a: FakeUpstream, b: FakeUpstream, dead_port: int) -> str:
    return f"""
providers:
  a: {{kind: openai, base_url: "{a.base}/v1", api_key_env: {UPSTREAM_KEY_ENV}}}
  b: {{kind: openai, base_url: "{b.base}/v1", api_key_env: {UPSTREAM_KEY_ENV}}}
  dead: {{kind: openai, base_url: "http://127.0.0.1:{dead_port}/v1"}}
  a-claude: {{kind: anthropic, base_url: "{a.base}/anthropic/v1"}}
  b-claude: {{kind: anthropic, base_url: "{b.base}/anthropic/v1"}}
  a-data: {{kind: http, base_url: "{a.base}"}}
  b-data: {{kind: http, base_url: "{b.base}"}}
  pool: {{kind: openai, base_url: "{b.base}/v1", api_key_envs: [POOL_KEY_1, POOL_KEY_2]}}
models:
  - id: pooled
    price: {{input: "1", output: "2"}}
    channels: [{{provider: pool}}]
  - id: chat-fo
    price: {{input: "1", output: "2"}}
    cost: {{input: "0.8", output: "1.6"}}
    channels:
      - {{provider: a, upstream_model: a-model}}
      - {{provider: b, priority: 1, cost: {{input: "0.5", output: "1"}}}}
  - id: dead-first
    price: {{input: "1", output: "2"}}
    channels: [{{provider: dead}}, {{provider: b, priority: 1}}]
  - id: tri
    price: {{input: "1", output: "2"}}
    channels: [{{provider: a}}, {{provider: b, priority: 1}}, {{provider: dead, priority: 2}}]
  - id: rl
    price: {{input: "1", output: "2"}}
    channels: [{{provider: a}}, {{provider: b, priority: 1}}]
  - id: mgn
    price: {{input: "1", output: "2"}}
    channels: [{{provider: b, cost: {{input: "0.5", output: "1"}}}}]
  - id: split
    price: {{input: "1", output: "2"}}
    channels: [{{provider: a, weight: 3}}, {{provider: b, weight: 1}}]
  - id: claude-fo
    price: {{input: "3", output: "15"}}
    channels: [{{provider: a-claude}}, {{provider: b-claude, priority: 1}}]
  - id: img-fo
    price: {{per_call: "0.04"}}
    channels: [{{provider: a}}, {{provider: b, priority: 1}}]
endpoints:
  - id: search-fo
    path: /search/web
    upstream_path: /search
    price: {{per_call: "0.002"}}
    channels: [{{provider: a-data}}, {{provider: b-data, priority: 1}}]
"""


ENV = {**GATEWAY_ENV, "TOLLWAY_UPSTREAM_HEADERS_TIMEOUT_SECONDS": "0.5",
       "TOLLWAY_CHANNEL_FAILURES": "1000", "TOLLWAY_CHANNEL_MAX_ATTEMPTS": "2",
       "POOL_KEY_1": "sk-pool-one", "POOL_KEY_2": "sk-pool-two"}


@pytest.fixture(scope="module")
def second() -> Iterator[FakeUpstream]:
    with FakeUpstream() as b:
        yield b


@pytest.fixture(scope="module")
def fakes(upstream: FakeUpstream, second: FakeUpstream) -> tuple[FakeUpstream, FakeUpstream]:
    """``a`` (the module's upstream, conftest's) and ``b``."""
    return upstream, second


@pytest.fixture(scope="module")
def serving(fakes: tuple[FakeUpstream, FakeUpstream]) -> Serving:
    return Serving(catalog=catalog(*fakes, closed_port()), env=ENV)


@pytest.fixture
def tw(served: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> Iterator[Tollway]:
    served.begin_test()
    fakes[1].reset()
    yield served
    served.close_clients()


def llm_calls(fake: FakeUpstream) -> int:
    return len(fake.llm_requests())


def attempts(record: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(a["channel"], a.get("status", a.get("error")))
            for a in json.loads(record["attempts"])]


def books_clean(tw: Tollway) -> None:
    assert tw.open_holds() == 0
    assert tw.verify() == []


def claude(tw: Tollway, key: str) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=tw.url, api_key=key, max_retries=0, timeout=20)
    tw._clients.append(client)
    return client


# --------------------------------------------------------------------------- every protocol


def _fail_a(a: FakeUpstream, protocol: str) -> None:
    if protocol in ("chat", "completions", "embeddings", "chat-stream"):
        a.llm = LLMScript(status=500)
    elif protocol in ("messages", "messages-stream"):
        a.anthropic = AnthropicScript(status=529)
    elif protocol == "responses":
        a.responses = ResponsesScript(status=503)
    elif protocol == "images":
        a.images = ImagesScript(status=500)
    else:
        a.data_replies["/search"] = DataReply(status=502, body=b'{"error": "down"}')


#: protocol → (model, the charge in nano-USD from b's usage at the listed price)
PROTOCOLS = {
    "chat": ("chat-fo", 30_000), "chat-stream": ("chat-fo", 30_000),
    "completions": ("chat-fo", 30_000),
    "embeddings": ("chat-fo", 20_000),  # 20 prompt tokens × 1000, no output
    "responses": ("chat-fo", 36_000),  # 30 × 1000 + 3 × 2000
    # 20 × 3000 + 4 × 15 000
    "messages": ("claude-fo", 120_000), "messages-stream": ("claude-fo", 120_000),
    "images": ("img-fo", 40_000_000),
    "data": ("search-fo", 2_000_000),
}


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_a_failing_first_channel_is_invisible_and_billed_once(
        tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream], protocol: str) -> None:
    a, b = fakes
    _fail_a(a, protocol)
    account = tw.account()
    key = tw.key(account)
    model, cost = PROTOCOLS[protocol]
    client = tw.client(key)
    if protocol == "chat":
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Hello there, friend!"
    elif protocol == "chat-stream":
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
            == "Hello there, friend!"
    elif protocol == "completions":
        assert client.completions.create(model=model, prompt="hi").choices[0].text
    elif protocol == "embeddings":
        assert client.embeddings.create(model=model, input="hi").data
    elif protocol == "responses":
        assert client.responses.create(model=model, input="hi").output_text \
            == "Responses say hi"
    elif protocol == "messages":
        message = claude(tw, key).messages.create(
            model=model, max_tokens=100, messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].text == "Hello from Claude."  # type: ignore[union-attr]
    elif protocol == "messages-stream":
        with claude(tw, key).messages.stream(
                model=model, max_tokens=100,
                messages=[{"role": "user", "content": "hi"}]) as stream:
            assert "".join(stream.text_stream) == "Hello from Claude."
    elif protocol == "images":
        assert len(client.images.generate(model=model, prompt="a cat").data or []) == 1
    else:
        response = tw.http().get("/apis/v1/search/web",
                                 headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200, response.text
    (record,) = tw.wait_records(1)
    assert (record["type"], record["status"], record["cost_nano"]) == ("consume", 200, cost)
    assert record["channel"] == f"{model}/b" + ("-claude" if model == "claude-fo" else
                                                 "-data" if model == "search-fo" else "")
    first, second = attempts(record)
    assert first[0].startswith(f"{model}/a") and first[1] in (500, 502, 503, 529)
    assert second == (record["channel"], 200)
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert tw.available(account) == TEN_USD - cost
    books_clean(tw)


def test_the_answering_channel_gets_its_own_upstream_model_and_cost(
        tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    key = tw.key(tw.account())
    tw.client(key).chat.completions.create(model="chat-fo",
                                           messages=[{"role": "user", "content": "hi"}])
    (record,) = tw.records()
    # channel a names its upstream model; the model's cost applies (0.8/1.6 per 1M)
    assert a.llm_requests()[0].json()["model"] == "a-model"
    assert (record["channel"], record["upstream_cost_nano"]) == ("chat-fo/a", 24_000)
    a.llm = LLMScript(status=500)
    tw.client(key).chat.completions.create(model="chat-fo",
                                           messages=[{"role": "user", "content": "hi"}])
    record = tw.records()[-1]
    # channel b has no upstream_model: the model's own (its id); b's cost (0.5/1 per 1M)
    assert b.llm_requests()[0].json()["model"] == "chat-fo"
    assert (record["channel"], record["upstream_cost_nano"], record["cost_nano"]) == (
        "chat-fo/b", 15_000, 30_000)


def test_a_key_pool_uses_each_key_in_turn(tw: Tollway,
                                          fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    key = tw.key(tw.account())
    for _ in range(4):
        tw.client(key).chat.completions.create(model="pooled",
                                               messages=[{"role": "user", "content": "hi"}])
    assert [r.headers["authorization"] for r in b.llm_requests()] == [
        "Bearer sk-pool-one", "Bearer sk-pool-two"] * 2
    assert [r["channel"] for r in tw.records()] == ["pooled/pool#1", "pooled/pool#2"] * 2


def test_refused_connection_fails_over(tw: Tollway,
                                       fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    account = tw.account()
    answer = tw.client(tw.key(account)).chat.completions.create(
        model="dead-first", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "Hello there, friend!"
    (record,) = tw.records()
    assert attempts(record) == [("dead-first/dead", "upstream_error"), ("dead-first/b", 200)]
    assert record["cost_nano"] == 30_000 and llm_calls(b) == 1
    books_clean(tw)


def test_slow_headers_fail_over(tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    a.llm = LLMScript(delay=1.5)  # longer than the 0.5 s headers timeout
    account = tw.account()
    tw.client(tw.key(account)).chat.completions.create(
        model="chat-fo", messages=[{"role": "user", "content": "hi"}])
    (record,) = tw.records()
    assert attempts(record) == [("chat-fo/a", "upstream_timeout"), ("chat-fo/b", 200)]
    assert tw.available(account) == TEN_USD - 30_000


def test_a_stream_cut_after_its_first_byte_is_not_retried(
        tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    a.llm = LLMScript(content=["Once ", "upon ", "a ", "time"], cut_after=1)
    account = tw.account()
    chunks = list(tw.client(tw.key(account)).chat.completions.create(
        model="chat-fo", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Once "
    (record,) = tw.records()
    assert llm_calls(b) == 0
    assert (record["channel"], record["usage_source"], record["type"]) == (
        "chat-fo/a", "estimated", "consume")
    books_clean(tw)


def test_every_channel_failing_is_one_error_and_no_charge(
        tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    a.llm = b.llm = LLMScript(status=500)
    account = tw.account()
    response = tw.http().post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {tw.key(account)}"}, json={
        "model": "tri", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 502
    (record,) = tw.records()
    # TOLLWAY_CHANNEL_MAX_ATTEMPTS=2: the third channel (dead) is never tried
    assert attempts(record) == [("tri/a", 500), ("tri/b", 500)]
    assert (record["type"], record["cost_nano"]) == ("error", 0)
    assert llm_calls(a) == 1 and llm_calls(b) == 1
    assert tw.available(account) == TEN_USD
    books_clean(tw)


def test_the_clients_own_4xx_is_not_retried(tw: Tollway,
                                            fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    a.llm = LLMScript(status=400, error_body={"error": {"message": "bad", "type": "invalid"}})
    account = tw.account()
    response = tw.http().post("/v1/chat/completions", headers={
        "Authorization": f"Bearer {tw.key(account)}"}, json={
        "model": "chat-fo", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and llm_calls(b) == 0
    assert tw.available(account) == TEN_USD


def test_429_with_retry_after_opens_the_channel_at_once(
        tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes

    async def limited(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "slow down"}}, status=429,
                                 headers={"Retry-After": "120"})

    a.hostile = limited
    key = tw.key(tw.account())
    for _ in range(3):
        tw.client(key).chat.completions.create(model="rl",
                                               messages=[{"role": "user", "content": "hi"}])
    # the first 429 opened rl/a for 120 s (its failure threshold is 1000): no second try
    assert len(a.requests) == 1 and llm_calls(b) == 3
    channels = {c["id"]: c for c in tw.http().get("/admin/v1/channels",
                                                  headers=ADMIN).json()["data"]}
    assert channels["rl/a"]["state"] == "open"
    assert 110_000 < channels["rl/a"]["open_for_ms"] <= 120_000
    assert channels["rl/b"]["state"] == "closed"
    records = tw.records()
    assert [r["cost_nano"] for r in records] == [30_000] * 3


def test_operator_views_name_the_channel_customers_do_not(
        tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    a.llm = LLMScript(status=500)
    key = tw.key(tw.account())
    raw = tw.client(key).chat.completions.with_raw_response.create(
        model="chat-fo", messages=[{"role": "user", "content": "hi"}])
    request_id = raw.headers["x-request-id"]
    mine = tw.http().get(f"/v1/billing/usage/{request_id}",
                         headers={"Authorization": f"Bearer {key}"}).json()
    assert not {"channel", "attempts", "upstream_cost_usd"} & set(mine)
    admin = tw.http().get(f"/admin/v1/usage/{request_id}", headers=ADMIN).json()
    assert admin["channel"] == "chat-fo/b"
    assert [(x["channel"], x.get("status")) for x in admin["attempts"]] == [
        ("chat-fo/a", 500), ("chat-fo/b", 200)]
    assert admin["upstream_cost_usd"] == "0.000015000"


def test_margin_and_reported_cost_reconciliation(
        tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    key = tw.key(tw.account())
    start = clock.now_ms() - 1000

    def ask(usage: dict[str, Any]) -> None:
        b.llm = LLMScript(usage=usage)
        tw.client(key).chat.completions.create(model="mgn",
                                               messages=[{"role": "user", "content": "hi"}])

    base = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    ask({**base, "cost": 0.000015})  # exactly the computed 15 000 nano-USD
    ask({**base, "cost": 0.0000155})  # 500 off: within 5 % of 15 000
    ask({**base, "cost": 0.00002})  # 5 000 off: flagged
    records = tw.records()
    assert [(r["upstream_cost_nano"], r["upstream_reported_cost_nano"],
             r["upstream_cost_mismatch"]) for r in records] == [
        (15_000, 15_000, False), (15_000, 15_500, False), (15_000, 20_000, True)]
    end = clock.now_ms() + 1000
    report = tw.http().get("/admin/v1/margin", headers=ADMIN, params={
        "from": _iso(start), "to": _iso(end), "group_by": "model"}).json()
    (line,) = [row for row in report["data"] if row["model"] == "mgn"]
    assert line == {"model": "mgn", "requests": 3, "revenue_usd": "0.000090000",
                    "upstream_cost_usd": "0.000045000", "margin_usd": "0.000045000",
                    "requests_without_cost": 0, "upstream_reported_cost_usd": "0.000050500",
                    "mismatched_records": 1}
    assert [m["request_id"] for m in report["mismatched_records"]
            if m["model"] == "mgn"] == [records[2]["request_id"]]
    by_channel = tw.http().get("/admin/v1/margin", headers=ADMIN, params={
        "from": _iso(start), "to": _iso(end), "group_by": "channel"}).json()
    assert any(row["channel"] == "mgn/b" and row["requests"] == 3
               for row in by_channel["data"])


def _iso(ms: int) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def test_weights_split_traffic(tw: Tollway, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    key = tw.key(tw.account(usd="100"))
    with httpx.Client(base_url=tw.url, timeout=20) as http:
        for _ in range(120):
            response = http.post("/v1/chat/completions",
                                 headers={"Authorization": f"Bearer {key}"},
                                 json={"model": "split",
                                       "messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 200
    # weight 3 : 1 → 90 expected on a; binomial sd √(120 × 0.75 × 0.25) ≈ 4.7; ±6 sd
    assert llm_calls(a) + llm_calls(b) == 120
    assert 62 <= llm_calls(a) <= 118


# --------------------------------------------------------------------------- breaker, disable


@pytest.fixture(params=["sqlite", "postgresql"])
def clocked(request: pytest.FixtureRequest, fakes: tuple[FakeUpstream, FakeUpstream]
            ) -> Iterator[tuple[Tollway, FakeClock]]:
    a, b = fakes
    a.reset()
    b.reset()
    fake_clock = FakeClock(clock.now_ms())
    env = {**ENV, "TOLLWAY_CHANNEL_FAILURES": "2", "TOLLWAY_CHANNEL_COOLDOWN_SECONDS": "30"}
    with fresh_database(request) as db, running_tollway(
            db, catalog(a, b, closed_port()), a, env=env, clock=fake_clock) as tollway:
        tollway.begin_test()
        yield tollway, fake_clock


def test_breaker_opens_waits_probes_and_closes(
        clocked: tuple[Tollway, FakeClock], fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    tw, fake_clock = clocked
    a, b = fakes
    a.llm = LLMScript(status=500)
    key = tw.key(tw.account())

    def ask() -> None:
        tw.client(key).chat.completions.create(model="chat-fo",
                                               messages=[{"role": "user", "content": "hi"}])

    def state() -> str:
        channels = tw.http().get("/admin/v1/channels", headers=ADMIN).json()["data"]
        return str(next(c["state"] for c in channels if c["id"] == "chat-fo/a"))

    ask()
    ask()  # the second consecutive failure opens chat-fo/a
    assert (llm_calls(a), llm_calls(b), state()) == (2, 2, "open")
    ask()
    assert (llm_calls(a), llm_calls(b)) == (2, 3)  # open: not tried
    fake_clock.advance(29)
    ask()
    assert llm_calls(a) == 2
    fake_clock.advance(1)
    assert state() == "half_open"
    ask()  # the probe fails: open again for the cooldown
    assert (llm_calls(a), llm_calls(b), state()) == (3, 5, "open")
    fake_clock.advance(30)
    a.llm = LLMScript()
    ask()  # the probe succeeds: closed
    assert (llm_calls(a), llm_calls(b), state()) == (4, 5, "closed")
    ask()
    assert llm_calls(a) == 5
    assert [r["cost_nano"] for r in tw.records()] == [30_000] * 7
    metrics = tw.http().get("/metrics", headers=ADMIN).text
    lines = metrics.splitlines()
    assert any(line.startswith('tollway_channel_state{channel="chat-fo/a",')
               and 'state="closed"' in line and line.endswith(" 1.0") for line in lines)
    # (the counters are the process's: other tests' gateways add to them)
    counted = [line for line in lines
               if line.startswith('tollway_channel_attempts_total{channel="chat-fo/a",')
               and 'outcome="500"' in line]
    assert counted and float(counted[0].rsplit(" ", 1)[1]) >= 3


def test_no_available_channel_is_503_with_retry_after(
        clocked: tuple[Tollway, FakeClock], fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    tw, fake_clock = clocked
    a, b = fakes
    a.llm = b.llm = LLMScript(status=500)
    account = tw.account()
    key = tw.key(account)
    for _ in range(2):
        tw.http().post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "rl", "messages": [{"role": "user", "content": "hi"}]})
    fake_clock.advance(10)
    response = tw.http().post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                              json={"model": "rl",
                                    "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_channel_available"
    assert response.headers["retry-after"] == "20"
    assert (llm_calls(a), llm_calls(b)) == (2, 2)
    assert tw.available(account) == TEN_USD


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_disabled_channel_gets_nothing_on_any_instance(
        request: pytest.FixtureRequest, backend: str,
        fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = fakes
    a.reset()
    b.reset()
    request.param = backend  # type: ignore[attr-defined]
    env = {**ENV, "TOLLWAY_CATALOG_REFRESH_SECONDS": "1"}
    with fresh_database(request) as db:
        text = catalog(a, b, closed_port())
        with running_tollway(db, text, a, env=env) as one, \
                running_tollway(db, text, a, env=env) as two:
            one.begin_test()
            key = one.key(one.account())
            put = httpx.put(f"{one.url}/admin/v1/channels/chat-fo/a", headers=ADMIN,
                            json={"enabled": False})
            assert put.status_code == 200 and put.json()["state"] == "disabled"
            _wait_state(two, "chat-fo/a", "disabled")
            for gateway in (one, two, one, two):
                gateway.client(key).chat.completions.create(
                    model="chat-fo", messages=[{"role": "user", "content": "hi"}])
            assert (llm_calls(a), llm_calls(b)) == (0, 4)
            assert httpx.put(f"{two.url}/admin/v1/channels/chat-fo/a", headers=ADMIN,
                             json={"enabled": True}).status_code == 200
            _wait_state(one, "chat-fo/a", "closed")
            one.client(key).chat.completions.create(
                model="chat-fo", messages=[{"role": "user", "content": "hi"}])
            assert llm_calls(a) == 1
            missing = httpx.put(f"{one.url}/admin/v1/channels/nope/x", headers=ADMIN,
                                json={"enabled": False})
            assert missing.status_code == 404


def _wait_state(tw: Tollway, channel: str, state: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        channels = httpx.get(f"{tw.url}/admin/v1/channels", headers=ADMIN).json()["data"]
        if next(c["state"] for c in channels if c["id"] == channel) == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"{channel} did not become {state}")
