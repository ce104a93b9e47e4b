"""Per-call data APIs through the gateway (``/apis/v1/...``), against the fake data API, on
SQLite and PostgreSQL.

A call costs ``price_per_call × ratio`` when the upstream answers 2xx and nothing otherwise;
the upstream's status, body and content type reach the client unchanged; the customer's
Tollway key never reaches the upstream, the operator's credential does, in the configured
place. Fake catalog prices: twitter-user 0.002 USD (header ``X-API-Key``), web-search
0.0015 USD (query ``api_key``; vip override 0.5), papers 0.02 USD (``Authorization: Bearer``).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fakes import (
    DATA_KEY,
    IGNORE_TOKENIZER_WARNING,
    USD,
    DataReply,
    Tollway,
    error_of,
)

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)
sqlite_only = pytest.mark.parametrize("served", ["sqlite"], indirect=True)

TEN_USD = 10 * USD
#: Headers a client may send that must stay at the gateway.
PRIVATE = {"Cookie": "session=abc", "X-Forwarded-For": "10.0.0.9", "Proxy-Authorization": "x"}


def auth(key: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **more}


def assert_never_forwarded(tw: Tollway, secret: str) -> None:
    assert tw.fake is not None
    for request in tw.fake.requests:
        assert secret not in json.dumps([request.headers, request.query, request.raw_path])
        assert secret.encode() not in request.body
        assert not {"cookie", "x-forwarded-for", "proxy-authorization",
                    "idempotency-key"} & set(request.headers)
        assert request.headers.get("authorization") in (None, f"Bearer {DATA_KEY}")


def test_a_2xx_is_charged_once_and_passes_through_unchanged(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account, name="scraper")
    csv = b"name,followers\r\njack,6000000\r\n"
    tw.fake.data_replies["/data/users/jack"] = DataReply(201, csv, "text/csv; charset=utf-8")
    response = tw.http().get("/apis/v1/twitter/user/jack?fields=name,followers&lang=en",
                             headers=auth(key, Accept="text/csv", **{"User-Agent": "bot/1"},
                                          **PRIVATE))
    # The upstream's answer exactly: status, body and content type.
    assert response.status_code == 201
    assert response.content == csv
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    # 0.002 USD × ratio 1 = 2_000_000 nano-USD.
    assert response.headers["x-tollway-cost-usd"] == "0.002000000"

    (forwarded,) = tw.fake.requests
    assert (forwarded.method, forwarded.path) == ("GET", "/data/users/jack")  # path parameter
    assert forwarded.query == [("fields", "name,followers"), ("lang", "en")]
    assert forwarded.headers["x-api-key"] == DATA_KEY  # the operator's credential, bare
    assert (forwarded.headers["accept"], forwarded.headers["user-agent"]) == ("text/csv",
                                                                              "bot/1")
    assert_never_forwarded(tw, key)

    (record,) = tw.records()
    assert record["request_id"] == response.headers["x-request-id"]
    assert {k: record[k] for k in (
        "type", "billing_type", "product", "route", "status", "stream", "calls",
        "per_call_nano", "input_nano_per_1m", "input_tokens", "output_tokens", "cost_nano",
        "ratio", "ratio_source", "key_name", "usage_source")} == {
        "type": "consume", "billing_type": "per_call", "product": "twitter-user",
        "route": "/apis/v1/twitter/user/jack", "status": 201, "stream": False, "calls": 1,
        "per_call_nano": 2_000_000, "input_nano_per_1m": None, "input_tokens": 0,
        "output_tokens": 0, "cost_nano": 2_000_000, "ratio": "1", "ratio_source": "group",
        "key_name": "scraper", "usage_source": "upstream"}
    assert tw.balance(account) == (TEN_USD - 2_000_000, 0)
    assert tw.open_holds() == 0 and tw.verify() == []


def test_4xx_and_5xx_pass_through_and_cost_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    tw.fake.data_replies["/data/users/nobody"] = DataReply(404, b'{"detail": "no such user"}')
    tw.fake.data_replies["/data/users/boom"] = DataReply(500, b"upstream exploded",
                                                         "text/plain")
    http = tw.http()
    missing = http.get("/apis/v1/twitter/user/nobody", headers=auth(key))
    broken = http.get("/apis/v1/twitter/user/boom", headers=auth(key))
    assert (missing.status_code, missing.content, missing.headers["content-type"]) == (
        404, b'{"detail": "no such user"}', "application/json")
    assert (broken.status_code, broken.content, broken.headers["content-type"]) == (
        500, b"upstream exploded", "text/plain")
    assert "x-tollway-cost-usd" not in missing.headers
    assert [(r["type"], r["status"], r["cost_nano"], r["calls"], r["error_code"])
            for r in tw.records()] == [("error", 404, 0, 0, "upstream_error"),
                                       ("error", 500, 0, 0, "upstream_error")]
    assert len(tw.fake.requests) == 2
    assert tw.balance(account) == (TEN_USD, 0)
    assert tw.open_holds() == 0 and tw.verify() == []


def test_query_credential_and_ratios(tw: Tollway) -> None:
    account = tw.account()
    plain = tw.key(account)
    vip = tw.key(account, group="vip")
    http = tw.http()
    responses = [
        http.get("/apis/v1/search/web", params={"q": "tollway gateway"}, headers=auth(plain)),
        http.get("/apis/v1/search/web", params={"q": "tollway gateway"}, headers=auth(vip)),
        http.get("/apis/v1/twitter/user/ada", headers=auth(vip)),
    ]
    # web-search 0.0015 × 1 = 1_500_000; × vip's override 0.5 = 750_000;
    # twitter-user 0.002 × vip's group ratio 0.8 = 1_600_000 nano-USD.
    assert [r.headers["x-tollway-cost-usd"] for r in responses] == [
        "0.001500000", "0.000750000", "0.001600000"]
    assert [(r["ratio"], r["ratio_source"], r["cost_nano"]) for r in tw.records()] == [
        ("1", "group", 1_500_000), ("0.5", "model", 750_000), ("0.8", "group", 1_600_000)]
    search = tw.fake.requests[0]
    assert (search.path, search.query) == ("/query/v2/search", [("q", "tollway gateway"),
                                                               ("api_key", DATA_KEY)])
    assert "x-api-key" not in search.headers
    assert json.loads(responses[0].content)["path"] == "/query/v2/search"
    assert_never_forwarded(tw, plain)
    assert_never_forwarded(tw, vip)
    assert tw.available(account) == TEN_USD - 1_500_000 - 750_000 - 1_600_000


@sqlite_only
def test_bearer_credential_and_a_post_body(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    body = b'{"query": "exact billing", "year": 2024}'
    tw.fake.data_replies["/bearer/papers/search"] = DataReply(200, b'{"papers": []}')
    response = tw.http().post("/apis/v1/scholar/search", content=body,
                              headers=auth(key, **{"Content-Type": "application/json"}))
    assert (response.status_code, response.content) == (200, b'{"papers": []}')
    (forwarded,) = tw.fake.requests
    assert (forwarded.method, forwarded.path, forwarded.body) == ("POST", "/bearer/papers/search",
                                                                  body)
    assert forwarded.headers["authorization"] == f"Bearer {DATA_KEY}"
    assert forwarded.headers["content-type"] == "application/json"
    assert_never_forwarded(tw, key)
    # 0.02 × 1 = 20_000_000 nano-USD
    assert tw.available(account) == TEN_USD - 20_000_000


@sqlite_only
def test_a_path_parameter_is_one_path_segment(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    http = tw.http()
    # "..": would climb out of /users/ to the upstream's root, on the operator's credential.
    for raw in ("..", "%2E%2E", "%2e"):
        response = http.get(f"/apis/v1/twitter/user/{raw}", headers=auth(key))
        assert response.status_code == 404, raw
        assert error_of(response)["code"] == "unknown_endpoint"
    assert tw.fake.requests == []
    # Reserved characters stay inside the segment: no smuggled query or fragment.
    for raw, name in (("a%3Fadmin=1", "a?admin=1"), ("a%23top", "a#top"), ("a%20b", "a b"),
                      ("100%25", "100%")):
        response = http.get(f"/apis/v1/twitter/user/{raw}", headers=auth(key))
        assert response.status_code == 200, raw
        forwarded = tw.fake.requests[-1]
        assert (forwarded.path, forwarded.query) == (f"/data/users/{name}", []), raw
    assert len(tw.records()) == 4
    assert tw.available(account) == TEN_USD - 4 * 2_000_000


@sqlite_only
def test_compressed_upstream_bodies_reach_the_client_readable(tw: Tollway) -> None:
    key = tw.key(tw.account())
    body = json.dumps({"results": ["x" * 50] * 40}).encode()
    tw.fake.data_replies["/data/users/big"] = DataReply(200, body, gzip=True)
    with httpx.Client(base_url=tw.url) as http:
        response = http.get("/apis/v1/twitter/user/big",
                            headers=auth(key, **{"Accept-Encoding": "gzip"}))
    assert response.status_code == 200
    assert response.content == body  # decoded, whatever the encoding on the way


@sqlite_only
def test_idempotent_retry_of_a_call(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    http = tw.http()
    tw.fake.data_replies["/data/users/jack"] = DataReply(200, b"first", "text/plain")
    first = http.get("/apis/v1/twitter/user/jack", headers=auth(key, **{"Idempotency-Key": "k1"}))
    tw.fake.data_replies["/data/users/jack"] = DataReply(200, b"second", "text/plain")
    again = http.get("/apis/v1/twitter/user/jack", headers=auth(key, **{"Idempotency-Key": "k1"}))
    assert (again.status_code, again.content, again.headers["content-type"]) == (
        200, b"first", "text/plain")
    assert again.headers["x-tollway-replayed-request-id"] == first.headers["x-request-id"]
    assert len(tw.fake.requests) == 1 and len(tw.records()) == 1
    other = http.get("/apis/v1/twitter/user/jill", headers=auth(key, **{"Idempotency-Key": "k1"}))
    assert other.status_code == 409
    assert error_of(other)["code"] == "idempotency_conflict"
    assert tw.available(account) == TEN_USD - 2_000_000


def test_402_refuses_before_forwarding(tw: Tollway) -> None:
    account = tw.account(nano=1_999_999)  # one nano-USD short of a 0.002 USD call
    key = tw.key(account)
    response = tw.http().get("/apis/v1/twitter/user/jack", headers=auth(key))
    assert response.status_code == 402
    assert error_of(response)["code"] == "insufficient_balance"
    assert tw.fake.requests == [] and tw.records() == []
    assert tw.balance(account) == (1_999_999, 0)


@sqlite_only
def test_an_unreachable_upstream_is_a_502_and_costs_nothing(tw: Tollway) -> None:
    account = tw.account()
    key = tw.key(account)
    response = tw.http().get("/apis/v1/dead", headers=auth(key))
    assert response.status_code == 502
    assert error_of(response)["code"] == "upstream_error"
    assert [(r["type"], r["cost_nano"]) for r in tw.records()] == [("error", 0)]
    assert tw.balance(account) == (TEN_USD, 0)
    assert tw.open_holds() == 0


@sqlite_only
def test_concurrent_calls_are_each_charged_once(tw: Tollway) -> None:
    account = tw.account(usd="0.05")  # 25 calls of 0.002
    key = tw.key(account)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=tw.url, timeout=30) as client:
            responses = await asyncio.gather(*[
                client.get(f"/apis/v1/twitter/user/u{i}", headers=auth(key))
                for i in range(40)])
        return sorted(r.status_code for r in responses)

    assert asyncio.run(burst()) == [200] * 25 + [402] * 15
    assert len(tw.fake.requests) == 25
    assert [r["cost_nano"] for r in tw.records()] == [2_000_000] * 25
    assert tw.balance(account) == (0, 0)
    assert tw.verify() == []
