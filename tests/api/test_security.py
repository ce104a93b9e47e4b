"""Who may do what, on SQLite and PostgreSQL, against a gateway under uvicorn.

- Every ``/admin/v1`` route of the Starlette router refuses a request without the admin token,
  with a wrong one, with a customer key or another scheme, and writes nothing.
- A customer's key reaches only its own account: every customer route is tried with another
  account's request ids, key ids, account ids and Idempotency-Keys.
- Secrets (the operator's upstream credentials, customer keys, the admin token) appear in no
  log line (captured at DEBUG), no response body, no database row.
- Keys are stored only as SHA-256 hashes; the admin token is compared with
  ``hmac.compare_digest``.
- Every route that reads a body refuses one above ``max_body_bytes`` with 413 and writes
  nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from aiohttp import web
from starlette.routing import Mount, Route

from fakes import (
    ADMIN_TOKEN,
    DATA_KEY,
    IGNORE_TOKENIZER_WARNING,
    MAX_BODY_BYTES,
    UPSTREAM_KEY,
    AnthropicScript,
    DataReply,
    LLMScript,
    Serving,
    Tollway,
    error_of,
)
from tollway.api import admin
from tollway.store import tables

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

HELLO = [{"role": "user", "content": "hello there"}]


class Captured(logging.Handler):
    """Every log record of every logger, formatted with its traceback, at DEBUG."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def logs() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)


@pytest.fixture(scope="module")
def serving(logs: Captured) -> Serving:
    """The default gateway, started once ``logs`` captures every record; no background
    deliverer (its attempts would race the tests that compare every row before and after)."""
    from fakes import GATEWAY_ENV
    return Serving(env={**GATEWAY_ENV, "TOLLWAY_NOTIFY_INTERVAL_SECONDS": "0"})


@dataclass
class Customer:
    account: int
    name: str
    secret: str
    key_id: int
    request_ids: list[str]

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def customer(tw: Tollway, http: httpx.Client) -> Customer:
    """An account with a key, one chat request and one data-API call on its log."""
    account = tw.account()
    secret = tw.key(account)
    auth = {"Authorization": f"Bearer {secret}"}
    chat = http.post("/v1/chat/completions", headers=auth,
                     json={"model": "gpt-test", "messages": HELLO})
    call = http.get("/apis/v1/twitter/user/jack", headers=auth)
    assert chat.status_code == call.status_code == 200, (chat.text, call.text)
    record = tw.key_record(secret)
    name = admin_get(http, f"/admin/v1/accounts/{account}").json()["name"]
    return Customer(account, name, secret, record.id,
                    [chat.headers["x-request-id"], call.headers["x-request-id"]])


def mint_code(http: httpx.Client, usd: str = "5") -> dict[str, Any]:
    response = http.post("/admin/v1/codes", json={"amount_usd": usd},
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 201, response.text
    code: dict[str, Any] = response.json()["data"][0]
    return code


def admin_get(http: httpx.Client, path: str, **params: Any) -> httpx.Response:
    response = http.get(path, params=params, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert response.status_code == 200, response.text
    return response


def every_route(app: Any) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route of the application, mounts included."""
    def walk(routes: list[Any], prefix: str) -> Iterator[tuple[str, str]]:
        for route in routes:
            if isinstance(route, Mount):
                yield from walk(route.routes, prefix + route.path)
            elif isinstance(route, Route):
                for method in sorted((route.methods or {"GET"}) - {"HEAD"}):
                    yield method, prefix + route.path
    return walk(app.routes, "")


def filled(path: str, values: dict[str, Any]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", str(value))
        path = path.replace("{" + name + ":path}", str(value))
        path = path.replace("{" + name + ":int}", str(value))
    assert "{" not in path, path
    return path


def database_rows(tw: Tollway) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (what a refused request could have written)."""
    with tw.db.read() as conn:
        return {name: sorted((tuple(str(v) for v in row) for row in
                              conn.execute(sa.select(table))), key=str)
                for name, table in tables.metadata.tables.items()}


# --------------------------------------------------------------------------- admin routes


def test_every_admin_route_needs_the_admin_token(tw: Tollway) -> None:
    http = tw.http()
    alice = customer(tw, http)
    values = {"account": alice.account, "key_id": alice.key_id,
              "request_id": alice.request_ids[0], "code_id": mint_code(http)["id"],
              "channel_id": "scholar-search/sandbox"}
    routes = [(m, p) for m, p in every_route(tw.gateway.app) if p.startswith("/admin/v1/")]
    assert len(routes) == len(admin.admin_routes) >= 22
    # main's notification and redemption-code routes are among them
    assert {p for _, p in routes} >= {"/admin/v1/codes", "/admin/v1/codes/{code_id}/revoke",
                                      "/admin/v1/accounts/{account}/notifications",
                                      "/admin/v1/accounts/{account}/notifications/settings"}
    refused = {
        "no token": {},
        "a customer key": alice.auth,
        "a wrong token": {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
        "a prefix of the token": {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
        "another scheme": {"Authorization": f"Basic {ADMIN_TOKEN}"},
        "the token without a scheme": {"Authorization": ADMIN_TOKEN},
        "an empty bearer": {"Authorization": "Bearer"},
    }
    before = database_rows(tw)
    for method, template in routes:
        path = filled(template, values)
        for why, headers in refused.items():
            response = http.request(method, path, headers={
                **headers, "Idempotency-Key": "sec-test"},
                json={"name": "intruder", "amount_usd": "100", "note": "x"})
            assert response.status_code == 401, (method, path, why, response.text)
            error = error_of(response)
            assert (error["type"], error["code"]) == ("authentication_error",
                                                      "invalid_admin_token"), (path, why)
    assert database_rows(tw) == before  # nothing was written by any refused request
    # the same paths work with the token (so the refusals above were not 404s in disguise)
    for method, template in routes:
        if method == "GET":
            response = http.get(filled(template, values), params={"month": "2025-01"},
                                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert response.status_code == 200, (template, response.text)


def test_the_admin_token_is_compared_in_constant_time() -> None:
    # Timing cannot be asserted in a test; the comparison itself is pinned instead.
    source = inspect.getsource(admin._check_admin)
    assert "hmac.compare_digest(" in source and "==" not in source


# --------------------------------------------------------------------------- customer routes


def test_a_key_reaches_only_its_own_account_on_every_customer_route(tw: Tollway) -> None:
    http = tw.http()
    alice, bob = customer(tw, http), customer(tw, http)
    month = admin_get(http, "/admin/v1/usage/" + alice.request_ids[0]).json()[
        "created_at"][:7]
    covered: set[str] = set()

    def get(path: str, **params: Any) -> httpx.Response:
        covered.add(path if "/usage/req_" not in path else "/v1/billing/usage/{request_id}")
        return http.get(path, headers=alice.auth, params=params)

    # balance: alice's account, whatever the query says
    response = get("/v1/billing/balance", account=bob.account)
    assert response.json()["account_id"] == alice.account
    # the usage log: bob's key id, account id or name change nothing
    for params in ({}, {"key": bob.key_id}, {"account": bob.account}, {"account": bob.name},
                   {"group": "default", "account_id": bob.account}):
        rows = get("/v1/billing/usage", limit=1000, **params).json()["data"]
        assert {r["account_id"] for r in rows} <= {alice.account}, params
        assert not {r["request_id"] for r in rows} & set(bob.request_ids), params
    assert get("/v1/billing/usage", key=bob.key_id).json()["data"] == []
    # one record: bob's read exactly like a missing one
    for request_id in bob.request_ids:
        response = get(f"/v1/billing/usage/{request_id}")
        assert response.status_code == 404
        assert error_of(response)["message"] == f"no usage record {request_id!r}"
    assert get(f"/v1/billing/usage/{alice.request_ids[0]}").status_code == 200
    # the export, in both formats
    for fmt in ("csv", "jsonl"):
        body = get("/v1/billing/usage/export", format=fmt, account=bob.account).text
        assert alice.request_ids[0] in body
        assert not any(rid in body for rid in bob.request_ids)
        assert get("/v1/billing/usage/export", format=fmt, key=bob.key_id).text.count(
            "req_") == 0
    # summary and statement: alice's numbers and name
    summary = get("/v1/billing/summary", account=bob.account, group_by="key").json()
    assert summary["account"]["id"] == alice.account
    assert {row["key_id"] for row in summary["data"]} == {alice.key_id}
    statement = get("/v1/billing/statement", month=month, account=bob.account).json()
    assert statement["account"]["name"] == alice.name
    # notifications: bob has settings and an event (his top-up); alice sees neither
    admin_auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    bob_settings = http.put(f"/admin/v1/accounts/{bob.account}/notifications/settings",
                            headers=admin_auth, json={"webhook_url": "https://hooks.example/bob",
                                                      "low_balance_threshold_usd": "1"}).json()
    assert bob_settings["account_id"] == bob.account
    topped = http.post(f"/admin/v1/accounts/{bob.account}/topups", json={"amount_usd": "1"},
                       headers={**admin_auth, "Idempotency-Key": "bob-topup"})
    assert topped.status_code in (200, 201), topped.text
    bob_events = admin_get(http, f"/admin/v1/accounts/{bob.account}/notifications").json()
    assert [e["type"] for e in bob_events["data"]] == ["balance.topup"]
    bob_balance = admin_get(http, f"/admin/v1/accounts/{bob.account}").json()["balance_usd"]
    for params in ({}, {"account": bob.account}, {"account_id": bob.account}):
        events = get("/v1/billing/notifications", limit=500, **params).json()["data"]
        assert events == [], params
        mine = get("/v1/billing/notifications/settings", **params).json()
        assert mine["account_id"] == alice.account and mine["webhook_url"] is None, params

    def send(method: str, path: str, **kwargs: Any) -> httpx.Response:
        covered.add(path)
        return http.request(method, path, headers=alice.auth,
                            params={"account": bob.account}, **kwargs)

    # the writes go to alice's settings, never bob's
    changed = send("PUT", "/v1/billing/notifications/settings",
                   json={"webhook_url": "https://hooks.example/alice"}).json()
    assert changed["account_id"] == alice.account
    rotated = send("POST", "/v1/billing/notifications/settings/rotate-secret").json()
    assert rotated["account_id"] == alice.account
    assert rotated["webhook_secret"] != changed["webhook_secret"]
    assert admin_get(http, f"/admin/v1/accounts/{bob.account}/notifications/settings"
                     ).json() == bob_settings
    # a code credits the redeeming key's account, once: bob cannot take it afterwards
    code = mint_code(http, "2")
    redeemed = send("POST", "/v1/billing/redeem", json={"code": code["code"]})
    assert redeemed.status_code == 201, redeemed.text
    assert redeemed.json()["account_id"] == alice.account
    again = http.post("/v1/billing/redeem", headers=bob.auth, json={"code": code["code"]})
    assert again.status_code == 409 and error_of(again)["code"] == "code_redeemed"
    assert admin_get(http, f"/admin/v1/accounts/{bob.account}").json()["balance_usd"] == (
        bob_balance)
    # card top-ups: the payer is the key's account (tests/test_payments.py covers them with
    # Stripe configured; here it is not, so a checkout is refused before anything is written)
    assert get("/v1/billing/payments", account=bob.account).json()["data"] == []
    started = send("POST", "/v1/billing/checkout", json={"amount_usd": "10",
                                                         "account_id": bob.account})
    assert started.status_code == 503 and error_of(started)["code"] == "payments_unavailable"
    # auto-recharge: the key's account's setting, whatever the query or body names
    saved = send("PUT", "/v1/billing/auto_recharge", json={
        "enabled": True, "threshold_usd": "5", "target_usd": "20", "monthly_cap_usd": "50"})
    assert saved.status_code == 200 and saved.json()["account_id"] == alice.account
    assert get("/v1/billing/auto_recharge", account=bob.account).json()["account_id"] == (
        alice.account)
    assert http.get("/v1/billing/auto_recharge", headers=bob.auth).json()["enabled"] is False
    card = send("POST", "/v1/billing/auto_recharge/card")
    assert card.status_code == 503 and error_of(card)["code"] == "payments_unavailable"
    # receipts: bob's paid order (written as its webhook would) is a 404 to alice's key
    from tollway.store import payments as order_store

    with tw.db.write() as conn:
        bobs = order_store.insert_order(conn, account_id=bob.account, provider="stripe",
                                        amount_nano=10**10, currency="usd", at_ms=1)
        order_store.mark_paid(conn, bobs, payment_intent=None, at_ms=2)
    covered.add("/v1/billing/payments/{order_id}/receipt.pdf")
    receipt = http.get(f"/v1/billing/payments/{bobs}/receipt.pdf", headers=alice.auth)
    assert receipt.status_code == 404 and error_of(receipt)["code"] == "not_found"
    assert http.get(f"/v1/billing/payments/{bobs}/receipt.pdf",
                    headers=bob.auth).status_code == 200
    # every customer report route of the application was tried above
    billing = {p for m, p in every_route(tw.gateway.app) if p.startswith("/v1/billing/")}
    assert billing == covered


#: A request to every metered POST route of the gateway (checked against the router).
METERED = {
    "/v1/chat/completions": {"model": "gpt-test", "messages": HELLO},
    "/v1/completions": {"model": "gpt-test", "prompt": "hello there"},
    "/v1/embeddings": {"model": "embed-test", "input": "hello there"},
    "/v1/messages": {"model": "claude-test", "max_tokens": 50, "messages": HELLO},
    "/v1/responses": {"model": "gpt-test", "input": "hello there"},
    "/v1/images/generations": {"model": "image-test", "prompt": "a lighthouse"},
}


def test_an_idempotency_key_replays_only_to_the_key_that_used_it(tw: Tollway) -> None:
    http = tw.http()
    alice, bob = customer(tw, http), customer(tw, http)
    gateway_posts = {p for m, p in every_route(tw.gateway.app)
                     if m == "POST" and p.startswith("/v1/") and not p.startswith("/v1/billing/")}
    # count_tokens is free and stateless: nothing to replay
    assert gateway_posts == {*METERED, "/v1/messages/count_tokens"}
    for path, body in METERED.items():
        idem = f"shared-retry-key{path}"
        first = http.post(path, json=body, headers={**alice.auth, "Idempotency-Key": idem})
        assert first.status_code == 200, (path, first.text)
        replay = http.post(path, json=body, headers={**alice.auth, "Idempotency-Key": idem})
        assert replay.headers["x-tollway-replayed-request-id"] == first.headers["x-request-id"]
        # bob's request with alice's Idempotency-Key (and body) is his own: forwarded, charged
        # to him, never alice's answer
        theirs = http.post(path, json=body, headers={**bob.auth, "Idempotency-Key": idem})
        assert theirs.status_code == 200, (path, theirs.text)
        assert "x-tollway-replayed-request-id" not in theirs.headers, path
        record = admin_get(http, f"/admin/v1/usage/{theirs.headers['x-request-id']}").json()
        assert record["account_id"] == bob.account, path
    # the same for a data API call
    call = http.get("/apis/v1/twitter/user/jack",
                    headers={**alice.auth, "Idempotency-Key": "call-key"})
    other = http.get("/apis/v1/twitter/user/jack",
                     headers={**bob.auth, "Idempotency-Key": "call-key"})
    assert "x-tollway-replayed-request-id" not in other.headers
    assert other.headers["x-request-id"] != call.headers["x-request-id"]
    assert tw.verify() == []


# --------------------------------------------------------------------------- secrets


async def echo_key(request: web.Request) -> web.StreamResponse:
    """An upstream that refuses the credential it was sent, quoting it."""
    sent = request.headers.get("authorization", "")
    return web.json_response({"error": {"message": f"Incorrect API key provided: {sent}",
                                        "type": "invalid_request_error"}}, status=401)


def test_secrets_never_reach_logs_errors_or_records(tw: Tollway, logs: Captured) -> None:
    http = tw.http()
    logs.lines.clear()
    alice = customer(tw, http)
    seen: list[bytes] = []

    def keep(response: httpx.Response) -> httpx.Response:
        seen.append(response.content + str(dict(response.headers)).encode())
        return response

    auth = alice.auth
    # upstreams that echo the credential they were sent, as real providers do
    tw.fake.llm = LLMScript(status=401, error_body={"error": {
        "message": f"Incorrect API key provided: {UPSTREAM_KEY}", "type": "invalid_key"}})
    keep(http.post("/v1/chat/completions", headers=auth,
                   json={"model": "gpt-test", "messages": HELLO}))
    tw.fake.llm = LLMScript(status=500, error_body={"error": f"bad key {UPSTREAM_KEY}"})
    keep(http.post("/v1/chat/completions", headers=auth,
                   json={"model": "gpt-test", "messages": HELLO}))
    # the Anthropic kind (x-api-key) and the Responses and images routes echo it too
    tw.fake.anthropic = AnthropicScript(status=401, error_body={"type": "error", "error": {
        "type": "authentication_error", "message": f"invalid x-api-key {UPSTREAM_KEY}"}})
    keep(http.post("/v1/messages", headers=auth,
                   json={"model": "claude-test", "max_tokens": 20, "messages": HELLO}))
    tw.fake.anthropic = AnthropicScript(status=529, error_body={"error": f"{UPSTREAM_KEY}"})
    keep(http.post("/v1/messages", headers=auth,
                   json={"model": "claude-test", "max_tokens": 20, "messages": HELLO,
                         "stream": True}))
    tw.fake.llm = LLMScript()
    tw.fake.hostile = echo_key
    keep(http.post("/v1/responses", headers=auth, json={"model": "gpt-test", "input": "hi"}))
    keep(http.post("/v1/images/generations", headers=auth,
                   json={"model": "image-test", "prompt": "a lighthouse"}))
    tw.fake.hostile = None
    tw.fake.data_replies = {path: DataReply(status=403, body=f"key {DATA_KEY} refused".encode(),
                                            content_type="text/plain")
                            for path in ("/data/users/jack", "/query/v2/search")}
    keep(http.get("/apis/v1/twitter/user/jack", headers=auth))
    keep(http.get("/apis/v1/search/web", headers=auth, params={"q": "x"}))
    keep(http.get("/apis/v1/dead", headers=auth))  # unreachable upstream
    # refused customers and operators
    keep(http.get("/v1/billing/balance", headers={"Authorization": f"Bearer {alice.secret}x"}))
    keep(http.get("/admin/v1/accounts", headers={"Authorization": f"Bearer {alice.secret}"}))
    keep(http.get("/admin/v1/accounts", headers={"Authorization": f"Bearer {ADMIN_TOKEN}x"}))
    keep(http.post("/v1/chat/completions", headers=auth, content=b"{not json"))
    tw.revoke(alice.secret)
    keep(http.post("/v1/chat/completions", headers=auth,
                   json={"model": "gpt-test", "messages": HELLO}))

    secrets = {"upstream key": UPSTREAM_KEY, "data key": DATA_KEY, "admin token": ADMIN_TOKEN,
               "customer key": alice.secret}
    # the upstream did get the operator's credentials (so their absence below means something)
    assert any(r.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}"
               for r in tw.fake.requests)
    assert any(r.headers.get("x-api-key") == UPSTREAM_KEY for r in tw.fake.requests)
    responses = b"\n".join(seen).decode("utf-8", "replace")
    assert "[redacted]" in responses  # the echoed credentials were replaced
    log_text = "\n".join(logs.lines)
    assert "tollway" in log_text or "httpcore" in log_text  # the capture did capture
    rows = database_rows(tw)
    dump = "\n".join(str(r) for table in rows.values() for r in table)
    for what, secret in secrets.items():
        assert secret not in responses, what
        assert secret not in log_text, what
        assert secret not in dump, what
    # keys are stored as their SHA-256 only
    digest = hashlib.sha256(alice.secret.encode()).hexdigest()
    assert any(digest in str(row) for row in rows["api_keys"])
    # usage records keep what the upstream said, without the credential
    notes = [r["note"] for r in tw.records() if r["note"]]
    assert any("[redacted]" in n for n in notes), notes


# --------------------------------------------------------------------------- body limits

#: Routes that never read their request body (so never buffer one, whatever its size).
READ_NO_BODY = {("POST", "/admin/v1/keys/{key_id}/revoke"),
                ("POST", "/admin/v1/codes/{code_id}/revoke"),
                ("POST", "/admin/v1/accounts/{account}/disable"),
                ("POST", "/admin/v1/accounts/{account}/enable"),
                ("POST", "/v1/billing/notifications/settings/rotate-secret"),
                ("POST", "/v1/billing/auto_recharge/card"),
                ("POST", "/admin/v1/accounts/{account}/notifications/settings/rotate-secret")}


def test_every_route_that_reads_a_body_refuses_one_too_large(tw: Tollway) -> None:
    http = tw.http()
    alice = customer(tw, http)
    values = {"account": alice.account, "key_id": alice.key_id, "path": "scholar/search",
              "account_id": alice.account, "action": "topup", "item_id": "gpt-test",
              "channel_id": "gpt-test/fakeai"}
    big = b"{" + b" " * MAX_BODY_BYTES + b"}"
    # the JSON API (the web console's HTML forms are not covered here yet: see SECURITY.md)
    routes = [(m, filled(p, values)) for m, p in every_route(tw.gateway.app)
              if m in ("POST", "PUT", "PATCH") and (m, p) not in READ_NO_BODY
              and p.startswith(("/v1/", "/apis/v1/", "/admin/v1/"))]
    # every metered route, the data APIs (each method), the customer's and every admin write
    assert {p for _, p in routes} >= {*METERED, "/apis/v1/scholar/search", "/admin/v1/accounts",
                                      "/v1/billing/redeem", "/v1/billing/notifications/settings",
                                      "/admin/v1/codes"}
    before = database_rows(tw)
    for method, path in routes:
        auth = ({"Authorization": f"Bearer {ADMIN_TOKEN}"} if path.startswith("/admin/")
                else alice.auth)
        declared = http.request(method, path, content=big, headers=auth)
        chunked = http.request(method, path, content=iter([big[:1000], big[1000:]]),
                               headers=auth)
        for response in (declared, chunked):
            assert response.status_code == 413, (method, path, response.text)
            body = response.json()
            if path.startswith("/v1/messages"):  # Anthropic's error shape, Tollway's code
                assert (body["type"], body["error"]["type"]) == ("error", "request_too_large")
                assert body["error"]["code"] == "payload_too_large"
            else:
                assert error_of(response)["code"] == "payload_too_large"
    assert database_rows(tw) == before
    # nothing was forwarded: the data API behind /apis/v1/scholar/search never saw a request
    assert [r.path for r in tw.fake.data_requests()] == ["/data/users/jack"]  # customer()
