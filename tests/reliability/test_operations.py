"""Operations: ``GET /metrics`` (Prometheus text), the structured access log, and load
shedding (``max_inflight_requests``), on SQLite and PostgreSQL.

Metrics are per process and the in-thread gateway shares the test process with other tests,
so each test reads the difference between two scrapes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from fakes import (
    ADMIN_TOKEN,
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    DataReply,
    FakeUpstream,
    Serving,
    Tollway,
    error_of,
)
from promtext import Samples, delta, parse
from tollway import clock
from tollway.billing import metering
from tollway.billing.metering import ClientKey
from tollway.errors import StorageUnavailable
from tollway.ledger import ledger
from tollway.logs import JsonFormatter, TextFormatter, log_config
from tollway.notify.deliverer import Deliverer
from tollway.runtime.context import Context
from tollway.runtime.observe import ObserveMiddleware
from tollway.store.accounts import KeyLimits
from tollway.store.db import Database, storage_error
from tollway.store.writer import Writer

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)
MAX_INFLIGHT = 4
METRICS_TOKEN = "metrics-scraper-token"
HELLO = [{"role": "user", "content": "hello"}]
CHAT_COST = 6_000  # 20 prompt × $0.15 + 5 output × $0.60, per 1M tokens


@pytest.fixture(scope="module")
def serving() -> Serving:
    return Serving(env={**GATEWAY_ENV, "TOLLWAY_MAX_INFLIGHT_REQUESTS": str(MAX_INFLIGHT),
                        "TOLLWAY_METRICS_TOKEN": METRICS_TOKEN, "TOLLWAY_LOG_REQUESTS": "all"})


def scrape(tw: Tollway, token: str = ADMIN_TOKEN) -> Samples:
    """Every sample (see ``promtext``); the test's server is labelled with the host name."""
    response = httpx.get(tw.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(response.text, socket.gethostname())


def test_metrics_count_requests_charges_and_upstream_errors(tw: Tollway,
                                                            upstream: FakeUpstream) -> None:
    key = tw.key(tw.account())
    client = tw.client(key)
    http = tw.http()
    before = scrape(tw)
    for _ in range(3):
        client.chat.completions.create(model="gpt-test", messages=HELLO)
    upstream.data_replies["/data/users/down"] = DataReply(status=503, body=b"{}")
    assert http.get("/apis/v1/twitter/user/alice",
                    headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert http.get("/apis/v1/twitter/user/down",
                    headers={"Authorization": f"Bearer {key}"}).status_code == 503
    after = scrape(tw, METRICS_TOKEN)  # the metrics token works as well as the admin token

    chat = 'route="/v1/chat/completions",product="gpt-test",status="200"'
    apis = 'route="/apis/v1/{path:path}",product="twitter-user"'
    assert delta(before, after, f"tollway_http_requests_total{{{chat}}}") == 3
    assert delta(before, after, f"tollway_http_request_duration_seconds_count{{{chat}}}") == 3
    assert delta(before, after, 'tollway_http_request_duration_seconds_bucket{'
                 f'{chat},le="+Inf"}}') == 3
    assert delta(before, after, f'tollway_http_requests_total{{{apis},status="200"}}') == 1
    assert delta(before, after, f'tollway_http_requests_total{{{apis},status="503"}}') == 1
    assert delta(before, after, 'tollway_charges_total{product="gpt-test"}') == 3
    assert delta(before, after, 'tollway_revenue_nano_usd_total{product="gpt-test"}') == (
        3 * CHAT_COST)
    assert delta(before, after, 'tollway_revenue_nano_usd_total{product="twitter-user"}') == (
        2_000_000)  # $0.002, the failed call is not revenue
    assert delta(before, after, 'tollway_upstream_errors_total{product="twitter-user",'
                 'code="upstream_error",status="503"}') == 1
    assert delta(before, after, "tollway_writer_batch_size_count{}") >= 4  # 4 holds, 4 closes
    assert after["tollway_writer_commit_seconds_count{}"] == after[
        "tollway_writer_commit_seconds_bucket{le=\"+Inf\"}"]
    assert after["tollway_open_holds{}"] == 0
    worker = f'worker="{os.getpid()}"'  # the test's server runs in this process
    assert after[f"tollway_process_peak_resident_memory_bytes{{{worker}}}"] > 0
    assert after[f"process_resident_memory_bytes{{{worker}}}"] > 0
    assert after[f"process_open_fds{{{worker}}}"] > 0
    assert after[f"process_cpu_seconds_total{{{worker}}}"] > 0


def test_metrics_label_every_protocol_route_and_limit_refusals(tw: Tollway) -> None:
    """Messages, Responses and images are routes of their own in the metrics; a request a
    rate limit refuses is a 429 with its code in the access log's scope and Retry-After."""
    key = tw.key(tw.account(), limits=KeyLimits(rpm=4))
    auth = {"Authorization": f"Bearer {key}"}
    http = tw.http()
    before = scrape(tw)
    assert http.post("/v1/messages", headers=auth, json={
        "model": "claude-test", "max_tokens": 50, "messages": HELLO}).status_code == 200
    assert http.post("/v1/responses", headers=auth, json={
        "model": "reasoner-test", "input": "hi"}).status_code == 200
    assert http.post("/v1/images/generations", headers=auth, json={
        "model": "image-test", "prompt": "a cat", "n": 1}).status_code == 200
    assert http.post("/v1/chat/completions", headers=auth, json={
        "model": "gpt-test", "messages": HELLO}).status_code == 200
    refused = http.post("/v1/messages", headers=auth, json={
        "model": "claude-test", "max_tokens": 50, "messages": HELLO})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"  # Anthropic's shape, our code
    assert int(refused.headers["retry-after"]) >= 1
    assert len(refused.headers.get_list("retry-after")) == 1  # one place adds it
    after = scrape(tw)
    for route, product, status in (("/v1/messages", "claude-test", 200),
                                   ("/v1/responses", "reasoner-test", 200),
                                   ("/v1/images/generations", "image-test", 200),
                                   ("/v1/messages", "claude-test", 429)):
        labels = f'route="{route}",product="{product}",status="{status}"'
        assert delta(before, after, f"tollway_http_requests_total{{{labels}}}") == 1, labels
    for product in ("claude-test", "reasoner-test", "image-test"):
        assert delta(before, after, f'tollway_charges_total{{product="{product}"}}') == 1


def test_metrics_show_open_holds_and_their_age(tw: Tollway) -> None:
    account = tw.account()
    with tw.db.write() as conn:
        hold = ledger.place_hold(conn, account, 1000, idempotency_key="ops-open-hold",
                                 ttl_ms=60_000, at_ms=clock.now_ms())
    try:
        samples = scrape(tw)
        assert samples["tollway_open_holds{}"] >= 1
        assert samples["tollway_oldest_open_hold_age_seconds{}"] >= 0
    finally:
        with tw.db.write() as conn:
            ledger.void_hold(conn, hold.id, at_ms=clock.now_ms())


def test_metrics_need_a_token(tw: Tollway) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(tw.url + "/metrics", headers=headers)
        assert response.status_code == 401
        assert error_of(response)["code"] == "invalid_admin_token"


def test_access_log_carries_the_request_and_never_a_secret(
        tw: Tollway, caplog: pytest.LogCaptureFixture) -> None:
    account = tw.account()
    key = tw.key(account)
    with caplog.at_level(logging.INFO, logger="tollway.access"):
        raw = tw.client(key).chat.completions.with_raw_response.create(
            model="gpt-test", messages=HELLO)
        refused = tw.http().get("/v1/billing/balance", headers={"Authorization": "Bearer nope"})
    request_id = raw.headers["x-request-id"]
    lines = {r.__dict__.get("request_id"): r for r in caplog.records
             if r.name == "tollway.access"}
    record = lines[request_id]
    entry = json.loads(JsonFormatter().format(record))
    assert {k: entry[k] for k in ("level", "logger", "request_id", "method", "route", "status",
                                  "account_id", "product", "cost_usd")} == {
        "level": "info", "logger": "tollway.access", "request_id": request_id, "method": "POST",
        "route": "/v1/chat/completions", "status": 200, "account_id": account,
        "product": "gpt-test", "cost_usd": "0.000006000"}
    assert entry["duration_ms"] >= 0
    text = TextFormatter().format(record)
    assert text.startswith("INFO:     POST /v1/chat/completions 200 ")
    assert f"request_id={request_id}" in text and "cost_usd=0.000006000" in text
    assert lines[refused.headers["x-request-id"]].__dict__["status"] == 401
    everything = "\n".join(JsonFormatter().format(r) + TextFormatter().format(r)
                           for r in caplog.records)
    assert key not in everything and "Bearer" not in everything and "nope" not in everything


def test_log_settings_refuse_unknown_values() -> None:
    assert log_config("json")["formatters"]["default"]["()"] == "tollway.logs.JsonFormatter"
    with pytest.raises(ValueError, match="text or json"):
        log_config("xml")
    with pytest.raises(ValueError, match="all, errors, none"):
        ObserveMiddleware(lambda *_: None, max_inflight=1, log_requests="yes")  # type: ignore


def test_by_default_only_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        status = 200 if scope["path"] == "/ok" else 404
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    observed = ObserveMiddleware(app, max_inflight=10, log_requests="errors")

    async def call(path: str) -> None:
        async def send(message: Any) -> None:
            return None

        await observed({"type": "http", "method": "GET", "path": path, "headers": []},
                       None, send)  # type: ignore[arg-type]

    with caplog.at_level(logging.INFO, logger="tollway.access"):
        asyncio.run(call("/ok"))
        asyncio.run(call("/missing"))
    assert [(r.__dict__["path"], r.__dict__["status"]) for r in caplog.records
            if r.name == "tollway.access"] == [("/missing", 404)]


async def flood(url: str, key: str, count: int) -> list[tuple[int, str | None, str, Any]]:
    """``count`` chat requests all at once: (status, error code, request id, Retry-After)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> tuple[int, str | None, str, Any]:
            async with session.post(url + "/v1/chat/completions",
                                    json={"model": "gpt-test", "messages": HELLO},
                                    headers={"Authorization": f"Bearer {key}"}) as response:
                body = await response.json(content_type=None)
                code = body["error"]["code"] if response.status != 200 else None
                if response.status != 200:
                    assert body["error"]["request_id"] == response.headers["x-request-id"]
                return (response.status, code, response.headers["x-request-id"],
                        response.headers.get("retry-after"))

        return await asyncio.gather(*(one() for _ in range(count)))


def test_overload_is_shed_with_503_and_charges_nothing(tw: Tollway,
                                                      upstream: FakeUpstream) -> None:
    account = tw.account()
    key = tw.key(account)
    upstream.llm.delay = 0.5  # every admitted request stays in flight a while
    before = scrape(tw)
    outcomes = asyncio.run(flood(tw.url, key, 60))
    seen = Counter((status, code, retry) for status, code, _, retry in outcomes)
    admitted = seen[(200, None, None)]
    shed = seen[(503, "overloaded", "1")]
    assert admitted + shed == 60, seen
    assert 1 <= admitted and shed >= 60 - 4 * MAX_INFLIGHT, seen  # most were shed at once
    after = scrape(tw)
    assert delta(before, after, "tollway_shed_requests_total{}") == shed
    # Shed requests never reached the upstream nor the books; the admitted ones paid.
    records = tw.wait_records(admitted)
    assert sorted(r["request_id"] for r in records) == sorted(
        rid for status, _, rid, _ in outcomes if status == 200)
    assert tw.balance(account) == (10 * 1_000_000_000 - admitted * CHAT_COST, 0)
    assert len(upstream.llm_requests()) == admitted
    # It recovers by itself: once the flood is over, requests go through again.
    upstream.llm.delay = 0
    again = asyncio.run(flood(tw.url, key, MAX_INFLIGHT))
    assert [status for status, *_ in again] == [200] * MAX_INFLIGHT
    assert tw.verify() == []


def test_a_retry_after_its_first_attempt_died_takes_the_idempotency_key_over(
        tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    key_id = tw.key_record(key).id
    body = json.dumps({"model": "gpt-test", "messages": HELLO}).encode()
    fingerprint = hashlib.sha256(b"POST /v1/chat/completions?\n" + body).hexdigest()
    with tw.db.write() as conn:  # what a process killed mid-request leaves behind
        metering.reserve(conn, request_id="req_died", account_id=account, key_id=key_id,
                         amount_nano=1_000, ttl_ms=60_000,
                         client_key=ClientKey(key_id, "retry-1", fingerprint), at_ms=clock.now_ms())
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "retry-1",
               "Content-Type": "application/json"}
    http = tw.http()
    busy = http.post("/v1/chat/completions", content=body, headers=headers)
    assert busy.status_code == 409 and error_of(busy)["code"] == "request_in_progress"
    with tw.db.write() as conn:  # the reaper, once the hold's TTL has passed
        assert [r.hold_id for r in ledger.expire_holds(conn, clock.now_ms() + 61_000)] != []
    retry = http.post("/v1/chat/completions", content=body, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.headers["x-tollway-cost-usd"] == "0.000006000"
    replay = http.post("/v1/chat/completions", content=body, headers=headers)
    assert replay.headers["x-tollway-replayed-request-id"] == retry.headers["x-request-id"]
    assert tw.balance(account) == (10 * 1_000_000_000 - CHAT_COST, 0)
    assert tw.verify() == []


def test_database_failures_are_storage_unavailable(tmp_path: Path) -> None:
    """The one mapping: a database that cannot be opened is 503 storage_unavailable for reads
    and for the writer, and anything else stays what it is."""
    db = Database(f"sqlite:///{tmp_path}")  # a directory: SQLite cannot open it
    ctx = Context(db=db, writer=Writer(db), admin_token="x", hold_ttl_ms=1000,
                  reaper_interval_s=1)
    try:
        with pytest.raises(StorageUnavailable) as read:
            asyncio.run(ctx.read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar()))
        with pytest.raises(StorageUnavailable):
            ctx.writer.call(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
        assert (read.value.status, read.value.code, read.value.retry_after_s) == (
            503, "storage_unavailable", 2)
        assert str(tmp_path) not in read.value.message  # no driver text, no paths or hosts
        assert storage_error(ValueError("not a database problem")) is None
    finally:
        ctx.writer.close()
        db.dispose()


def test_background_tasks_warn_without_a_traceback_when_the_database_is_down(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The reaper and the notification deliverer keep running through an outage and say so in
    one warning line per round, not a traceback (an outage is not a bug)."""
    db = Database(f"sqlite:///{tmp_path}")  # a directory: SQLite cannot open it
    writer = Writer(db)

    async def rounds() -> None:
        ctx = Context(db=db, writer=writer, admin_token="x", hold_ttl_ms=1000,
                      reaper_interval_s=1, deliverer=Deliverer(writer.run),
                      notify_interval_s=0.05)
        ctx.start()
        try:
            for _ in range(400):  # until both said it (the reaper's first round is at 1 s)
                messages = {r.getMessage() for r in caplog.records}
                if {REAPER_DOWN, DELIVERER_DOWN} <= messages:
                    break
                await asyncio.sleep(0.05)
        finally:
            await ctx.stop()

    with caplog.at_level(logging.WARNING, logger="tollway"):
        asyncio.run(rounds())
    messages = {r.getMessage() for r in caplog.records}
    assert {REAPER_DOWN, DELIVERER_DOWN} <= messages, messages
    assert all(r.exc_info is None for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "tollway")


REAPER_DOWN = "releasing expired holds failed: the database is unavailable"
DELIVERER_DOWN = "delivering notifications failed: the database is unavailable"


def test_pages_and_static_files_pass_the_observing_middleware(tw: Tollway) -> None:
    """The web console's pages and /static get request ids, metrics and shedding like the
    API; an HTML error page shows the request id its X-Request-Id header carries."""
    http = tw.http()
    before = scrape(tw)
    css = http.get("/static/tollway.css")
    assert css.status_code == 200 and css.headers["x-request-id"].startswith("req_")
    missing = http.get("/no-such-page")
    assert missing.status_code == 404
    assert missing.headers["content-type"].startswith("text/html")
    request_id = missing.headers["x-request-id"]
    assert f"<code>{request_id}</code>" in missing.text
    signin = http.get("/login")
    assert signin.headers["x-request-id"].startswith("req_")
    after = scrape(tw)
    assert delta(before, after, 'tollway_http_requests_total{route="/static",product="",'
                 'status="200"}') == 1
    assert delta(before, after, 'tollway_http_requests_total{route="(unmatched)",product="",'
                 'status="404"}') == 1
    assert signin.status_code == 200
    assert delta(before, after, 'tollway_http_requests_total{route="/login",product="",'
                 'status="200"}') == 1


def test_shedding_answers_html_on_page_paths() -> None:
    """A shed page request gets a small HTML page (503, Retry-After, the request id); an API
    path keeps the JSON error."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("a shed request never reaches the app")

    shedding = ObserveMiddleware(app, max_inflight=0, log_requests="none")

    async def call(path: str) -> tuple[int, dict[str, str], bytes]:
        sent: list[Any] = []

        async def send(message: Any) -> None:
            sent.append(message)

        await shedding({"type": "http", "method": "GET", "path": path, "headers": []},
                       None, send)  # type: ignore[arg-type]
        headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
        return sent[0]["status"], headers, sent[1]["body"]

    for page in ("/console", "/login", "/admin/accounts", "/market"):
        status, headers, body = asyncio.run(call(page))
        assert (status, headers["content-type"], headers["retry-after"]) == (
            503, "text/html; charset=utf-8", "1"), page
        assert b"<h1>503" in body and headers["x-request-id"].encode() in body
    for api in ("/v1/billing/balance", "/admin/v1/accounts", "/apis/v1/x", "/healthz"):
        status, headers, body = asyncio.run(call(api))
        assert (status, headers["content-type"]) == (503, "application/json"), api
        error = json.loads(body)["error"]
        assert (error["code"], error["request_id"]) == ("overloaded", headers["x-request-id"])
