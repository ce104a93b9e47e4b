"""The HTTP service on SQLite and PostgreSQL: marketplace, balance, admin API, error shape.

The app runs under ``TestClient`` used as a context manager, so its lifespan starts the
writer thread exactly as uvicorn would. The last test starts the real ``tollway serve`` as
``make serve`` does on a fresh machine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tollway import clock
from tollway.app import create_app
from tollway.billing import keys as key_ops
from tollway.ledger import ledger
from tollway.pricing.catalog import load_catalog, parse_catalog
from tollway.store import accounts as store
from tollway.store.catalog import apply_catalog
from tollway.store.db import Database
from webclient import login

with warnings.catch_warnings():
    # starlette 1.x prefers httpx2 for its test client; httpx works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "examples" / "catalog.yaml"
ADMIN = {"Authorization": "Bearer adm-test"}
USD = re.compile(r"^-?\d+\.\d{9}$")
NANO = 1_000_000_000


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def prepared(db_url: str) -> dict[str, Any]:
    """The demo catalog; alice (default group) with 5 USD, a settled request and an open
    hold; keys: a good one, a revoked one, an expired one."""
    db = Database(db_url)
    now = clock.now_ms()
    with db.write() as conn:
        apply_catalog(conn, load_catalog(CATALOG), now_ms=now)
        alice = store.create_account(conn, "alice", "default", at_ms=now)
        ledger.topup(conn, alice.id, 5 * NANO, idempotency_key="seed", at_ms=clock.now_ms())
        good = key_ops.create_key(conn, alice.id, at_ms=now, name="good")
        revoked = key_ops.create_key(conn, alice.id, at_ms=now, name="revoked")
        store.revoke_key(conn, revoked.record.id, at_ms=now)
        expired = key_ops.create_key(conn, alice.id, at_ms=now - 2000, name="expired",
                                     expires_at_ms=now - 1000)
        settled = ledger.place_hold(conn, alice.id, NANO, idempotency_key="h1", ttl_ms=60_000,
                                    at_ms=clock.now_ms())
        ledger.settle_hold(conn, settled.id, 123_456_789, idempotency_key="s1",
                           at_ms=clock.now_ms())
        ledger.place_hold(conn, alice.id, 1_250_000_000, idempotency_key="h2", ttl_ms=60_000,
                          at_ms=clock.now_ms())
    db.dispose()
    return {"alice": alice, "key": good.secret, "revoked": revoked.secret,
            "expired": expired.secret}


@pytest.fixture
def client(db_url: str, prepared: dict[str, Any]) -> Iterator[TestClient]:
    with TestClient(create_app(database_url=db_url, admin_token="adm-test")) as c:
        yield c


def state(db_url: str) -> dict[str, Any]:
    """What a refused request could have written."""
    db = Database(db_url)
    try:
        with db.read() as conn:
            return {table: sorted(tuple(str(v) for v in row) for row in
                                  conn.execute(sa.text(f"SELECT * FROM {table}")))
                    for table in ("accounts", "api_keys", "entries", "postings", "holds")}
    finally:
        db.dispose()


def assert_error(response: Any, status: int, code: str, type_: str | None = None) -> str:
    """The one error shape, with the request id of the response header. Returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body.keys() == {"error"}
    error = body["error"]
    assert error.keys() == {"type", "code", "message", "param", "request_id"}
    assert error["code"] == code, error
    if type_ is not None:
        assert error["type"] == type_
    assert isinstance(error["message"], str) and error["message"]
    assert error["request_id"].startswith("req_")
    assert error["request_id"] == response.headers["x-request-id"]
    return str(error["message"])


# --------------------------------------------------------------------------- public routes


def test_healthz(client: TestClient, db_url: str) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": db_url.split(":")[0].split("+")[0]}
    assert response.headers["x-request-id"].startswith("req_")
    assert client.get("/healthz").headers["x-request-id"] != response.headers["x-request-id"]


def test_marketplace_lists_every_item_with_prices_per_group(client: TestClient) -> None:
    response = client.get("/v1/marketplace")
    assert response.status_code == 200
    body = response.json()
    assert body["groups"] == {"default": "1", "vip": "0.8"}
    items = {item["id"]: item for item in body["data"]}
    assert {i: item["billing_type"] for i, item in items.items()} == {
        "sandbox-chat": "token", "sandbox-reasoner": "token", "sandbox-embed": "token",
        "sandbox-claude": "token", "sandbox-image": "per_call",
        "web-search": "per_call", "stock-quote": "per_call", "scholar-search": "per_call"}

    def money_strings(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key.endswith("_usd"):
                    assert isinstance(inner, str), (key, inner)
                    yield inner
                else:
                    yield from money_strings(inner)
        elif isinstance(value, list):
            for inner in value:
                yield from money_strings(inner)

    prices = list(money_strings(body))
    # 4 token models × 5 prices × (price + 2 groups), 3 endpoints × 1 × 3, the image model
    # (per_call + 2 sizes) × 3
    assert len(prices) == 4 * 5 * 3 + 3 * 3 + 3 * 3 and all(USD.match(p) for p in prices), prices

    chat = items["sandbox-chat"]
    assert chat["price"] == {"input_per_1m_usd": "0.150000000",
                             "output_per_1m_usd": "0.600000000",
                             "cache_read_per_1m_usd": "0.075000000",
                             "cache_write_per_1m_usd": "0.150000000",  # falls back to input
                             "cache_write_1h_per_1m_usd": "0.150000000"}
    assert chat["price_display"] == ["$0.150000 / 1M input tokens",
                                     "$0.600000 / 1M output tokens",
                                     "$0.075000 / 1M cached input tokens"]
    assert chat["group_prices"]["default"] == {"ratio": "1", "ratio_source": "group",
                                               **chat["price"]}
    # the model's vip override 0.7: 0.15×0.7, 0.60×0.7, 0.075×0.7
    assert chat["group_prices"]["vip"] == {"ratio": "0.7", "ratio_source": "model",
                                           "input_per_1m_usd": "0.105000000",
                                           "output_per_1m_usd": "0.420000000",
                                           "cache_read_per_1m_usd": "0.052500000",
                                           "cache_write_per_1m_usd": "0.105000000",
                                           "cache_write_1h_per_1m_usd": "0.105000000"}
    assert chat["max_output_tokens"] == 4096
    assert chat["routes"] == ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                              "/v1/responses", "/v1/messages"]
    assert chat["providers"] == {"openai": "sandbox", "anthropic": "sandbox"}
    assert items["sandbox-embed"]["routes"] == ["/v1/embeddings"]  # narrowed in the catalog

    claude = items["sandbox-claude"]
    assert claude["price_display"] == ["$3.000000 / 1M input tokens",
                                       "$15.000000 / 1M output tokens",
                                       "$0.300000 / 1M cached input tokens",
                                       "$3.750000 / 1M cache-write tokens",
                                       "$6.000000 / 1M cache-write (1h) tokens"]
    # vip 0.8: 6 × 0.8 = 4.8
    assert claude["group_prices"]["vip"]["cache_write_1h_per_1m_usd"] == "4.800000000"

    image = items["sandbox-image"]
    assert image["price"] == {"per_call_usd": "0.040000000", "per_size": {
        "1024x1024": {"per_call_usd": "0.040000000"},
        "1792x1024": {"per_call_usd": "0.080000000"}}}
    assert image["price_display"] == ["$0.040000 / per image",
                                      "$0.040000 / per image (1024x1024)",
                                      "$0.080000 / per image (1792x1024)"]
    assert image["routes"] == ["/v1/images/generations"]
    assert image["group_prices"]["vip"]["per_size"]["1792x1024"] == {
        "per_call_usd": "0.064000000"}

    # the group's ratio 0.8: 2.50×0.8, 10×0.8, 1.25×0.8, 3.125×0.8
    assert items["sandbox-reasoner"]["group_prices"]["vip"] == {
        "ratio": "0.8", "ratio_source": "group", "input_per_1m_usd": "2.000000000",
        "output_per_1m_usd": "8.000000000", "cache_read_per_1m_usd": "1.000000000",
        "cache_write_per_1m_usd": "2.500000000", "cache_write_1h_per_1m_usd": "2.500000000"}
    # written as YAML numbers 0.02 and 0: 0.02×0.8 = 0.016
    embed = items["sandbox-embed"]["group_prices"]
    assert (embed["default"]["input_per_1m_usd"], embed["vip"]["input_per_1m_usd"],
            embed["vip"]["output_per_1m_usd"]) == ("0.020000000", "0.016000000", "0.000000000")

    web = items["web-search"]
    assert web["price"] == {"per_call_usd": "0.002000000"}
    assert web["price_display"] == ["$0.002000 / per call"]
    assert web["group_prices"] == {
        "default": {"ratio": "1", "ratio_source": "group", "per_call_usd": "0.002000000"},
        "vip": {"ratio": "0.8", "ratio_source": "group", "per_call_usd": "0.001600000"}}
    assert (web["name"], web["method"], web["path"]) == ("Web search", "GET",
                                                         "/apis/v1/search/web")
    # 0.0005×0.8 = 0.0004, 0.02×0.8 = 0.016
    assert items["stock-quote"]["group_prices"]["vip"]["per_call_usd"] == "0.000400000"
    assert items["stock-quote"]["path"] == "/apis/v1/finance/quote/{symbol}"
    assert items["scholar-search"]["group_prices"]["vip"]["per_call_usd"] == "0.016000000"
    assert items["scholar-search"]["method"] == "POST"
    assert all(isinstance(item["price_version"], int) for item in items.values())


def test_marketplace_rounds_a_price_after_ratio_half_up(db_url: str) -> None:
    db = Database(db_url)
    with db.write() as conn:
        apply_catalog(conn, parse_catalog("""\
providers: {sandbox: {kind: sandbox}}
groups: {half: {ratio: "0.5"}, third: {ratio: "0.333"}}
models:
  - id: tiny
    provider: sandbox
    price: {input: "0.000000003", output: "0.2009"}
    group_ratios: {third: "0.7"}
"""), now_ms=clock.now_ms())
    db.dispose()
    with TestClient(create_app(database_url=db_url, admin_token="adm-test")) as client:
        (tiny,) = client.get("/v1/marketplace").json()["data"]
    prices = tiny["group_prices"]
    # 0.000000003×0.5 = 0.0000000015 → half-up 0.000000002; 0.2009×0.5 = 0.10045 exactly
    assert (prices["half"]["input_per_1m_usd"], prices["half"]["output_per_1m_usd"]) == (
        "0.000000002", "0.100450000")
    # override 0.7: 0.000000003×0.7 = 0.0000000021 → 0.000000002; 0.2009×0.7 = 0.14063
    assert prices["third"]["ratio"] == "0.7"
    assert (prices["third"]["input_per_1m_usd"], prices["third"]["output_per_1m_usd"]) == (
        "0.000000002", "0.140630000")
    assert tiny["price"]["output_per_1m_usd"] == "0.200900000"


# --------------------------------------------------------------------------- balance


def test_balance_with_a_valid_key(client: TestClient, prepared: dict[str, Any]) -> None:
    response = client.get("/v1/billing/balance",
                          headers={"Authorization": f"Bearer {prepared['key']}"})
    assert response.status_code == 200
    body = response.json()
    # 5 topped up; 0.123456789 charged; 1.25 held by an open hold
    assert body == {"object": "balance", "account_id": prepared["alice"].id,
                    "balance_usd": "4.876543211", "held_usd": "1.250000000",
                    "available_usd": "3.626543211", "used_usd": "0.123456789",
                    "paid_usd": "3.626543211", "promotional_usd": "0.000000000",
                    "requests": 1}
    assert response.headers["x-request-id"].startswith("req_")
    # the scheme is case-insensitive
    assert client.get("/v1/billing/balance", headers={
        "Authorization": f"bearer {prepared['key']}"}).status_code == 200


BAD_AUTH = [
    (None, "invalid_api_key"),
    ("", "invalid_api_key"),
    ("Bearer ", "invalid_api_key"),
    ("Bearer tw-not-a-real-key", "invalid_api_key"),
    ("Bearer {key}x", "invalid_api_key"),
    ("Basic {key}", "invalid_api_key"),
    ("{key}", "invalid_api_key"),
    ("Bearer {revoked}", "revoked_api_key"),
    ("Bearer {expired}", "expired_api_key"),
]


def test_balance_refuses_bad_keys_in_the_error_shape(client: TestClient,
                                                     prepared: dict[str, Any]) -> None:
    for auth, code in BAD_AUTH:
        headers = {} if auth is None else {"Authorization": auth.format(**prepared)}
        response = client.get("/v1/billing/balance", headers=headers)
        message = assert_error(response, 401, code, "authentication_error")
        for secret in (prepared["key"], prepared["revoked"], prepared["expired"]):
            assert secret not in message


# --------------------------------------------------------------------------- admin


def test_admin_routes_need_the_admin_token(client: TestClient, db_url: str,
                                           prepared: dict[str, Any]) -> None:
    before = state(db_url)
    alice = prepared["alice"].id
    for headers in ({}, {"Authorization": "Bearer wrong"},
                    {"Authorization": "Bearer adm-test-and-more"},
                    {"Authorization": "Basic adm-test"}, {"Authorization": "adm-test"},
                    {"Authorization": f"Bearer {prepared['key']}"}):  # a customer key
        for method, path, body in (
                ("GET", "/admin/v1/accounts", None),
                ("POST", "/admin/v1/accounts", {"name": "mallory"}),
                ("GET", f"/admin/v1/accounts/{alice}", None),
                ("POST", f"/admin/v1/accounts/{alice}/topups", {"amount_usd": "100"}),
                ("POST", f"/admin/v1/accounts/{alice}/adjustments",
                 {"amount_usd": "100", "note": "gift"}),
                ("POST", f"/admin/v1/accounts/{alice}/keys", {}),
                ("POST", "/admin/v1/keys/1/revoke", None),
                ("GET", "/admin/v1/ledger/verify", None)):
            response = client.request(method, path, json=body, headers=headers)
            assert_error(response, 401, "invalid_admin_token", "authentication_error")
    assert state(db_url) == before


def test_admin_creates_and_reads_accounts(client: TestClient, db_url: str) -> None:
    response = client.post("/admin/v1/accounts", json={"name": "bob", "group": "vip"},
                           headers=ADMIN)
    assert response.status_code == 201
    bob = response.json()
    assert (bob["name"], bob["group"], bob["available_usd"]) == ("bob", "vip", "0.000000000")
    assert isinstance(bob["id"], int)
    carol = client.post("/admin/v1/accounts", json={"name": "carol"}, headers=ADMIN).json()
    assert carol["group"] == "default"

    assert client.get(f"/admin/v1/accounts/{bob['id']}", headers=ADMIN).json() == bob
    assert client.get("/admin/v1/accounts/bob", headers=ADMIN).json() == bob
    names = [a["name"] for a in client.get("/admin/v1/accounts", headers=ADMIN).json()["data"]]
    assert names == ["alice", "bob", "carol"]

    before = state(db_url)
    for body, fragment in (({"name": "dave", "group": "gold"}, "unknown group 'gold'"),
                           ({}, "name is required"),
                           ({"name": 7}, "name must be a string"),
                           ({"name": "bob"}, "already exists")):
        response = client.post("/admin/v1/accounts", json=body, headers=ADMIN)
        assert fragment in assert_error(response, 400, "invalid_request",
                                        "invalid_request_error")
    assert state(db_url) == before


def _available(client: TestClient, account: int | str) -> str:
    return str(client.get(f"/admin/v1/accounts/{account}", headers=ADMIN)
               .json()["available_usd"])


def test_admin_topup_with_an_idempotency_key_credits_once(
        client: TestClient, db_url: str, prepared: dict[str, Any]) -> None:
    alice = prepared["alice"].id
    path = f"/admin/v1/accounts/{alice}/topups"
    headers = {**ADMIN, "Idempotency-Key": "invoice-2026-001"}
    first = client.post(path, json={"amount_usd": "2.5", "note": "invoice"}, headers=headers)
    second = client.post(path, json={"amount_usd": "2.5", "note": "invoice"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()
    assert first.json()["amount_usd"] == "2.500000000"
    assert first.json()["available_usd"] == "6.126543211"  # 3.626543211 + 2.5
    assert _available(client, alice) == "6.126543211"

    before = state(db_url)
    conflict = client.post(path, json={"amount_usd": "3"}, headers=headers)
    assert "invoice-2026-001" in assert_error(conflict, 409, "idempotency_conflict")
    assert state(db_url) == before

    # by name, without a key: every request is its own top-up
    for _ in range(2):
        assert client.post("/admin/v1/accounts/alice/topups", json={"amount_usd": "1"},
                           headers=ADMIN).status_code == 201
    assert _available(client, "alice") == "8.126543211"


def test_admin_topup_reads_json_numbers_exactly(client: TestClient,
                                                prepared: dict[str, Any]) -> None:
    path = f"/admin/v1/accounts/{prepared['alice'].id}/topups"
    response = client.post(path, content=b'{"amount_usd": 3.25}', headers={
        **ADMIN, "Content-Type": "application/json"})
    assert response.status_code == 201
    assert response.json()["amount_usd"] == "3.250000000"
    assert response.json()["available_usd"] == "6.876543211"
    # 0.1 three times is exactly 0.3 (a binary float would not be)
    for _ in range(3):
        client.post(path, content=b'{"amount_usd": 0.1}', headers={
            **ADMIN, "Content-Type": "application/json"})
    assert _available(client, "alice") == "7.176543211"
    response = client.post(path, content=b'{"amount_usd": 12}', headers=ADMIN)
    assert response.json()["amount_usd"] == "12.000000000"


BAD_AMOUNTS = [b'"-1"', b"-1", b"-0.5", b'"0"', b"0", b'"abc"', b'""', b"1e-20",
               b"0.0000000001", b"1.0000000000000001", b"NaN", b"Infinity", b"-Infinity",
               b"true", b"null", b"[1]", b'{"usd": 1}', b"99999999999", b'" 1 2 "']


def test_admin_topup_refuses_bad_amounts_and_writes_nothing(
        client: TestClient, db_url: str, prepared: dict[str, Any]) -> None:
    path = f"/admin/v1/accounts/{prepared['alice'].id}/topups"
    before = state(db_url)
    for amount in BAD_AMOUNTS:
        response = client.post(path, content=b'{"amount_usd": ' + amount + b"}",
                               headers={**ADMIN, "Content-Type": "application/json",
                                        "Idempotency-Key": "bad"})
        message = assert_error(response, 400, "invalid_request", "invalid_request_error")
        assert "amount_usd" in message, (amount, message)
    assert state(db_url) == before
    # the refused requests did not use up their idempotency key
    ok = client.post(path, json={"amount_usd": "1"}, headers={**ADMIN, "Idempotency-Key": "bad"})
    assert ok.status_code == 201


def test_admin_unknown_account_is_404(client: TestClient, db_url: str) -> None:
    before = state(db_url)
    for method, path, body in (
            ("GET", "/admin/v1/accounts/nobody", None),
            ("GET", "/admin/v1/accounts/424242", None),
            ("GET", "/admin/v1/accounts/99999999999999999999", None),
            ("GET", "/admin/v1/accounts/%C2%B2", None),  # "²" is a digit to str.isdigit()
            ("POST", "/admin/v1/accounts/nobody/topups", {"amount_usd": "1"}),
            ("POST", "/admin/v1/accounts/424242/topups", {"amount_usd": "1"}),
            ("POST", "/admin/v1/accounts/nobody/adjustments", {"amount_usd": "1", "note": "x"}),
            ("GET", "/admin/v1/accounts/nobody/keys", None),
            ("POST", "/admin/v1/accounts/nobody/keys", {})):
        response = client.request(method, path, json=body, headers=ADMIN)
        assert_error(response, 404, "unknown_account", "not_found_error")
    assert state(db_url) == before


def test_admin_keys_secret_shown_once_listing_never_shows_it_revoke(
        client: TestClient, db_url: str, prepared: dict[str, Any]) -> None:
    alice = prepared["alice"].id
    response = client.post(f"/admin/v1/accounts/{alice}/keys",
                           json={"name": "ci", "models": ["sandbox-chat"], "quota_usd": "2.5",
                                 "expires_at": "2099-01-01T00:00:00Z", "group": "vip"},
                           headers=ADMIN)
    assert response.status_code == 201
    created = response.json()
    secret = created["key"]
    assert secret.startswith(created["prefix"]) and created["prefix"].startswith("tw-")
    assert (created["account_id"], created["name"], created["models"], created["quota_usd"],
            created["expires_at"], created["effective_group"]) == (
        alice, "ci", ["sandbox-chat"], "2.500000000", "2099-01-01T00:00:00Z", "vip")

    listing = client.get(f"/admin/v1/accounts/{alice}/keys", headers=ADMIN)
    assert listing.status_code == 200
    assert secret not in listing.text
    for secret_of_fixture in (prepared["key"], prepared["revoked"], prepared["expired"]):
        assert secret_of_fixture not in listing.text
    keys = listing.json()["data"]
    assert [k["name"] for k in keys] == ["good", "revoked", "expired", "ci"]
    assert all("key" not in k for k in keys)
    assert secret not in json.dumps(state(db_url))

    auth = {"Authorization": f"Bearer {secret}"}
    assert client.get("/v1/billing/balance", headers=auth).status_code == 200

    revoked = client.post(f"/admin/v1/keys/{created['id']}/revoke", headers=ADMIN)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None and "key" not in revoked.json()
    assert_error(client.get("/v1/billing/balance", headers=auth), 401, "revoked_api_key")

    before = state(db_url)
    for key_id in ("424242", "99999999999999999999", "0"):
        assert_error(client.post(f"/admin/v1/keys/{key_id}/revoke", headers=ADMIN), 404,
                     "unknown_api_key")
    for key_id in ("abc", "%C2%B2", "-1"):
        assert_error(client.post(f"/admin/v1/keys/{key_id}/revoke", headers=ADMIN), 400,
                     "invalid_request")
    for body, fragment in (({"models": ["nope"]}, "unknown catalog ids"),
                           ({"models": "sandbox-chat"}, "models must be a list"),
                           ({"quota_usd": "-1"}, "quota_usd"),
                           ({"quota_usd": 0.5e-10}, "quota_usd"),
                           ({"expires_at": "soon"}, "expires_at"),
                           ({"group": "gold"}, "unknown group")):
        response = client.post(f"/admin/v1/accounts/{alice}/keys", json=body, headers=ADMIN)
        assert fragment in assert_error(response, 400, "invalid_request")
    assert state(db_url) == before


def test_admin_ledger_verify(client: TestClient, db_url: str, prepared: dict[str, Any]
                             ) -> None:
    response = client.get("/admin/v1/ledger/verify", headers=ADMIN)
    assert (response.status_code, response.json()) == (200, {"ok": True, "problems": []})

    db = Database(db_url)
    with db.write() as conn:
        conn.execute(sa.text("UPDATE accounts SET held_nano = held_nano + 5 WHERE id = :id"),
                     {"id": prepared["alice"].id})
    db.dispose()
    response = client.get("/admin/v1/ledger/verify", headers=ADMIN)
    assert response.status_code == 500
    body = response.json()
    assert body["ok"] is False
    assert any(p.startswith(f"account {prepared['alice'].id} (alice): stored held balance "
                            "1.250000005 USD") for p in body["problems"]), body


# --------------------------------------------------------------------------- errors


def test_unknown_routes_and_methods_in_the_error_shape(client: TestClient) -> None:
    for path in ("/v1/nope", "/admin/v1/nope", "/admin/v1/accounts/1/nope"):
        assert_error(client.get(path, headers=ADMIN), 404, "not_found", "not_found_error")
    page = client.get("/nope")  # outside the APIs, a person reads the answer: an HTML page
    assert page.status_code == 404 and page.headers["content-type"].startswith("text/html")
    assert_error(client.delete("/healthz"), 405, "method_not_allowed")
    assert_error(client.post("/v1/marketplace"), 405, "method_not_allowed")


MALFORMED = [b"{not json", b'{"name": "x"', b"\xff\xfe", b'"a string"', b"[1, 2]", b"42",
             b"[" * 100_000]


def test_malformed_json_body_is_400_in_the_error_shape(client: TestClient, db_url: str) -> None:
    before = state(db_url)
    for body in MALFORMED:
        for path in ("/admin/v1/accounts", "/admin/v1/accounts/alice/topups",
                     "/admin/v1/accounts/alice/keys"):
            response = client.post(path, content=body,
                                   headers={**ADMIN, "Content-Type": "application/json"})
            message = assert_error(response, 400, "invalid_request", "invalid_request_error")
            assert message in ("the request body is not valid JSON",
                               "the request body must be a JSON object"), (body[:20], message)
    assert state(db_url) == before


def test_an_unexpected_error_is_500_in_the_error_shape_with_the_id_logged(
        db_url: str, prepared: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    import tollway.api.routes as api_routes

    def broken(conn: Any, *, now_ms: int) -> Any:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(api_routes, "listing", broken)
    app = create_app(database_url=db_url, admin_token="adm-test")
    with caplog.at_level(logging.ERROR, logger="tollway"), \
            TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/v1/marketplace")
    assert_error(response, 500, "internal_error", "api_error")
    assert "fire" not in response.text
    request_id = response.headers["x-request-id"]
    assert any(request_id in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------- the real server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy for localhost
    try:
        with direct.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_real_server_as_make_serve_starts_it(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tollway"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY_")}
    env.update(TOLLWAY_DATABASE_URL=f"sqlite:///{tmp_path / 't.db'}",
               TOLLWAY_DATA_DIR=str(tmp_path / "var"))
    upgrade = subprocess.run([str(script), "db", "upgrade"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert upgrade.returncode == 0, upgrade.stderr

    def serve() -> tuple[str, str, str, str]:
        """Start, check, stop: (admin token, demo key, demo console password, available
        balance) as printed."""
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [str(script), "serve", "--port", str(port), "--catalog", str(CATALOG), "--demo"],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        watchdog = threading.Timer(60, proc.kill)  # nothing below may hang the suite
        watchdog.start()
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, proc.communicate()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the server did not start in 30 s"
                    time.sleep(0.05)
            # the banner is printed (and flushed) before uvicorn opens the port
            assert proc.stdout is not None
            banner = [proc.stdout.readline() for _ in range(2)]
            assert banner[0] == f"Tollway on {base}\n"
            token = re.fullmatch(r"  admin token : (twadm-\S+)\n", banner[1])
            assert token, banner
            line = proc.stdout.readline()
            demo = re.fullmatch(r"  demo key    : (tw-\S+)\n", line)
            assert demo, line
            line = proc.stdout.readline()
            console = re.fullmatch(rf"  console     : {base}/login  \(login: demo, "
                                   r"password: (\S+)\)\n", line)
            assert console, line
            # the quick start's console sign-in, with the printed password
            with httpx.Client(base_url=base, trust_env=False) as web:
                assert login(web, "demo", console[1]).status_code == 303
                page = web.get("/console")
                assert page.status_code == 200 and "10.000000000" in page.text
                assert login(web, "demo", console[1] + "x").status_code == 401

            status, market = _get(f"{base}/v1/marketplace")
            assert status == 200
            assert {item["id"] for item in market["data"]} >= {"sandbox-chat", "web-search"}
            status, balance = _get(f"{base}/v1/billing/balance", demo[1])
            assert status == 200, balance
            status, accounts = _get(f"{base}/admin/v1/accounts", token[1])
            assert status == 200 and [a["name"] for a in accounts["data"]] == ["demo"]
            status, error = _get(f"{base}/admin/v1/accounts", "wrong")
            assert status == 401 and error["error"]["code"] == "invalid_admin_token"
        finally:
            proc.terminate()
            out, err = proc.communicate(timeout=20)
            watchdog.cancel()
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.returncode in (0, -signal.SIGTERM), err
        assert "Application shutdown complete." in err and "Traceback" not in err
        return token[1], demo[1], console[1], balance["available_usd"]

    token, demo_key, password, available = serve()
    assert available == "10.000000000"
    assert (tmp_path / "var" / "admin-token").read_text().strip() == token
    assert (tmp_path / "var" / "demo-password").read_text().strip() == password
    for secret in ("admin-token", "demo-key", "demo-password"):
        assert (tmp_path / "var" / secret).stat().st_mode & 0o777 == 0o600, secret
    # a restart keeps the token, the key and the password (still signing in: checked in
    # serve()) and does not credit the demo twice
    assert serve() == (token, demo_key, password, "10.000000000")
