"""Low-balance and top-up notifications: the outbox written with the money, signed webhooks,
retries with backoff, attempts visible to the customer, concurrent deliverers, email.

The balance is driven down through real gateway requests on the sandbox provider's
``web-search`` endpoint (0.002 USD a call; its hold is the exact price), the receiver is a
real HTTP server on 127.0.0.1, and signatures are checked with the README's scheme written
out by hand (hmac + hashlib).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.server
import itertools
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tollway.clock
from fakes import GATEWAY_ENV, USD, Serving, Tollway, running_tollway
from tollway import cli, clock
from tollway.billing import credits
from tollway.billing import notifications as notify
from tollway.errors import InsufficientBalance
from tollway.ledger import ledger
from tollway.money import format_usd
from tollway.notify import signing
from tollway.notify.deliverer import Deliverer, Policy
from tollway.store import accounts as account_store
from tollway.store.db import Database
from tollway.store.migrate import upgrade

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
#: The server's own deliverer is off: each test delivers when it chooses, with its policy.
ENV = {**GATEWAY_ENV, "TOLLWAY_NOTIFY_INTERVAL_SECONDS": "0",
       "TOLLWAY_NOTIFY_ALLOW_PRIVATE_TARGETS": "true"}  # the receiver is on 127.0.0.1
ADMIN = {"Authorization": "Bearer test-admin-token"}
NOW_POLICY = Policy(retry_base_ms=0, allow_private_targets=True, timeout_s=5)


# --------------------------------------------------------------------------- the receiver


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver: answers each POST as ``script`` says ("ok", "500", "drop": close
    the connection without an answer), then "ok"; keeps every request it read."""
    script: list[str] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append(Received(dict(self.headers.items()), body))
                    action = receiver.script.pop(0) if receiver.script else "ok"
                if action == "drop":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.send_response(500 if action == "500" else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/tollway"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def check_signature(secret: str, got: Received) -> dict[str, Any]:
    """The README's receiver check, by hand: HMAC-SHA256 over "<timestamp>.<body>"."""
    timestamp = got.headers["X-Tollway-Timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + got.body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["X-Tollway-Signature"], "v1=" + expected)
    event: dict[str, Any] = got.json()
    assert got.headers["X-Tollway-Event-Id"] == event["id"]
    assert got.headers["Content-Type"] == "application/json"
    return event


def deliver(db: Database, policy: Policy = NOW_POLICY,
            clock_ms: Callable[[], int] = tollway.clock.now_ms) -> int:
    """``tollway notify deliver``: every due attempt, on a deliverer of the test's own."""
    async def run() -> int:
        d = Deliverer(lambda fn: asyncio.to_thread(db.run_write, fn), policy, clock_ms=clock_ms)
        try:
            return await d.drain()
        finally:
            await d.close()
    return asyncio.run(run())


# --------------------------------------------------------------------------- served gateway


@pytest.fixture(scope="module")
def serving() -> Serving:
    return Serving(catalog=CATALOG.read_text(), env=ENV)


def test_one_signed_low_balance_event_per_crossing(tw: Tollway, receiver: Receiver) -> None:
    account = tw.account(usd="0.010")
    key = tw.key(account)
    http = tw.http()
    auth = {"Authorization": f"Bearer {key}"}
    saved = http.put("/v1/billing/notifications/settings", headers=auth, json={
        "low_balance_threshold_usd": "0.005", "webhook_url": receiver.url})
    assert saved.status_code == 200, saved.text
    settings = saved.json()
    secret = settings["webhook_secret"]
    assert secret.startswith("whsec_") and len(secret) > 40
    assert settings["low_balance_threshold_usd"] == "0.005000000"
    assert http.get("/v1/billing/notifications/settings", headers=auth).json() == settings

    def search() -> None:
        r = http.get("/apis/v1/search/web", params={"q": "tollway"}, headers=auth)
        assert r.status_code == 200 and r.headers["x-tollway-cost-usd"] == "0.002000000"

    search()
    search()  # 0.010 -> 0.008 -> 0.006: above the threshold
    assert deliver(tw.db) == 0 and receiver.received == []
    search()  # 0.006 -> 0.004: crosses below 0.005
    search()  # 0.004 -> 0.002: stays below, no second event
    assert deliver(tw.db) == 1
    assert deliver(tw.db) == 0
    [low] = receiver.received
    event = check_signature(secret, low)
    assert event["type"] == "balance.low" and event["account_id"] == account
    assert event["data"] == {"available_usd": "0.004000000", "threshold_usd": "0.005000000"}
    assert event["id"].startswith("evt_") and event["created_at"].endswith("Z")

    topup = http.post(f"/admin/v1/accounts/{account}/topups", headers=ADMIN,
                      json={"amount_usd": "0.010"})
    assert topup.status_code == 201  # 0.002 -> 0.012: a top-up event, and re-armed
    assert deliver(tw.db) == 1
    event = check_signature(secret, receiver.received[1])
    assert event["type"] == "balance.topup"
    assert event["data"] == {"amount_usd": "0.010000000", "available_usd": "0.012000000",
                             "source": "topup", "entry_id": topup.json()["entry_id"]}

    for _ in range(3):
        search()  # 0.012 -> 0.010 -> 0.008 -> 0.006
    assert deliver(tw.db) == 0
    search()  # 0.006 -> 0.004: the second crossing
    search()  # 0.004 -> 0.002
    assert deliver(tw.db) == 1
    event = check_signature(secret, receiver.received[2])
    assert event["type"] == "balance.low"
    assert event["data"] == {"available_usd": "0.004000000", "threshold_usd": "0.005000000"}
    assert len({r.json()["id"] for r in receiver.received}) == 3
    assert tw.available(account) == 2_000_000

    log = http.get("/v1/billing/notifications", headers=auth).json()
    assert [e["type"] for e in log["data"]] == ["balance.low", "balance.topup", "balance.low"]
    assert all(e["deliveries"][0]["status"] == "delivered" for e in log["data"])
    assert tw.verify() == []


def test_a_receiver_that_fails_twice_gets_the_event_on_the_third_attempt(
        tw: Tollway, receiver: Receiver) -> None:
    account = tw.account(usd="1")
    key = tw.key(account)
    auth = {"Authorization": f"Bearer {key}"}
    http = tw.http()
    secret = http.put("/v1/billing/notifications/settings", headers=auth,
                      json={"webhook_url": receiver.url}).json()["webhook_secret"]
    receiver.script = ["500", "drop"]
    with tw.db.write() as conn:
        credits.topup(conn, account, 2 * USD, idempotency_key=f"retry-{account}",
                      at_ms=clock.now_ms())

    # a fake clock: retries after 60 s, then 120 s (base 60 s, doubled); no sleeping
    now = [clock.now_ms()]
    policy = Policy(retry_base_ms=60_000, max_attempts=5, allow_private_targets=True,
                    timeout_s=5)
    assert deliver(tw.db, policy, lambda: now[0]) == 1  # attempt 1: HTTP 500
    assert deliver(tw.db, policy, lambda: now[0]) == 0  # not due yet
    now[0] += 59_999
    assert deliver(tw.db, policy, lambda: now[0]) == 0
    now[0] += 1
    assert deliver(tw.db, policy, lambda: now[0]) == 1  # attempt 2: connection dropped
    now[0] += 119_999
    assert deliver(tw.db, policy, lambda: now[0]) == 0
    now[0] += 1
    assert deliver(tw.db, policy, lambda: now[0]) == 1  # attempt 3: delivered
    now[0] += 10**9
    assert deliver(tw.db, policy, lambda: now[0]) == 0

    assert len(receiver.received) == 3
    bodies = {r.body for r in receiver.received}
    assert len(bodies) == 1  # the same document every time; each attempt signed afresh
    event = check_signature(secret, receiver.received[2])
    assert event["data"]["amount_usd"] == "2.000000000"
    assert event["data"]["available_usd"] == "3.000000000"

    [shown] = http.get("/v1/billing/notifications", headers=auth).json()["data"]
    assert shown["id"] == event["id"] and shown["type"] == "balance.topup"
    [delivery] = shown["deliveries"]
    assert (delivery["channel"], delivery["status"], delivery["attempts"]) == (
        "webhook", "delivered", 3)
    attempts = delivery["attempt_log"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["status_code"] for a in attempts] == [500, None, 204]
    assert attempts[0]["error"] == "HTTP 500"
    assert attempts[1]["error"] == "the receiver closed the connection"  # not the raw error
    assert attempts[2]["error"] is None
    assert all(a["target"] == receiver.url and a["duration_ms"] >= 0 for a in attempts)
    # the operator sees the same
    admin_view = http.get(f"/admin/v1/accounts/{account}/notifications", headers=ADMIN).json()
    assert admin_view["data"][0]["deliveries"] == shown["deliveries"]
    # another customer does not
    other = tw.key(tw.account())
    assert http.get("/v1/billing/notifications",
                    headers={"Authorization": f"Bearer {other}"}).json()["data"] == []


def test_a_delivery_gives_up_after_max_attempts(tw: Tollway, receiver: Receiver) -> None:
    account = tw.account(usd="1")
    with tw.db.write() as conn:
        notify.update(conn, account, {"webhook_url": receiver.url}, at_ms=clock.now_ms())
        credits.topup(conn, account, USD, idempotency_key=f"giveup-{account}", at_ms=clock.now_ms())
    receiver.script = ["500"] * 10
    policy = Policy(retry_base_ms=0, max_attempts=3, allow_private_targets=True, timeout_s=5)
    assert deliver(tw.db, policy) == 3
    with tw.db.read() as conn:
        [event] = notify.events_page(conn, account)["data"]
    assert event["deliveries"][0]["status"] == "failed"
    assert event["deliveries"][0]["attempts"] == 3


def test_private_addresses_are_refused_unless_allowed(tw: Tollway, receiver: Receiver) -> None:
    account = tw.account(usd="1")
    with tw.db.write() as conn:
        notify.update(conn, account, {"webhook_url": receiver.url}, at_ms=clock.now_ms())
        credits.topup(conn, account, USD, idempotency_key=f"ssrf-{account}", at_ms=clock.now_ms())
    assert deliver(tw.db, Policy(retry_base_ms=0, max_attempts=1)) == 1
    assert receiver.received == []
    with tw.db.read() as conn:
        [event] = notify.events_page(conn, account)["data"]
    [attempt] = event["deliveries"][0]["attempt_log"]
    assert attempt["error"] == "the webhook address is not a public address"


def test_settings_are_validated_and_the_secret_rotates(tw: Tollway) -> None:
    key = tw.key(tw.account())
    auth = {"Authorization": f"Bearer {key}"}
    http = tw.http()
    path = "/v1/billing/notifications/settings"
    for bad in ({"webhook_url": "ftp://x"}, {"email": "no-at-sign"},
                {"low_balance_threshold_usd": "1.2.3"}, {"low_balance_threshold_usd": "-1"},
                {"colour": "red"}, {"email": "a@b.c\r\nBcc: x@y.z"}):
        r = http.put(path, headers=auth, json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", bad
    first = http.put(path, headers=auth, json={"email": "ops@example.com"}).json()
    rotated = http.post(path + "/rotate-secret", headers=auth).json()
    assert rotated["webhook_secret"] != first["webhook_secret"]
    assert rotated["email"] == "ops@example.com"
    cleared = http.put(path, headers=auth, json={"email": None}).json()
    assert cleared["email"] is None and cleared["webhook_secret"] == rotated["webhook_secret"]
    assert http.get(path).status_code == 401


# --------------------------------------------------------------------------- per database


def _configured_account(db: Database, url: str, usd: int = 100) -> tuple[int, str]:
    with db.write() as conn:
        account = account_store.create_account(conn, "hooked", "default",
                                               at_ms=clock.now_ms()).id
        ledger.topup(conn, account, usd * USD, idempotency_key="seed", at_ms=clock.now_ms())
        secret = notify.update(conn, account, {"webhook_url": url},
                               at_ms=clock.now_ms())["webhook_secret"]
    return account, secret


def test_two_deliverers_deliver_each_attempt_once(db_url: str, receiver: Receiver) -> None:
    db = Database(db_url)
    account, secret = _configured_account(db, receiver.url)
    for i in range(40):
        with db.write() as conn:
            credits.topup(conn, account, USD, idempotency_key=f"t{i}", at_ms=clock.now_ms())
    # two workers, each with its own connections, claiming small batches at the same time
    workers = [Database(db_url) for _ in range(2)]
    policy = Policy(retry_base_ms=0, allow_private_targets=True, batch=3, timeout_s=5)

    async def both() -> list[int]:
        ds = [Deliverer(lambda fn, w=w: asyncio.to_thread(w.run_write, fn), policy)
              for w in workers]
        try:
            return list(await asyncio.gather(*(d.drain() for d in ds)))
        finally:
            for d in ds:
                await d.close()

    counts = asyncio.run(both())
    assert sum(counts) == 40
    ids = [check_signature(secret, r)["id"] for r in receiver.received]
    assert len(ids) == 40 and len(set(ids)) == 40
    with db.read() as conn:
        page = notify.events_page(conn, account, limit=100)["data"]
    assert all(e["deliveries"][0]["attempts"] == 1 for e in page)
    assert all(len(e["deliveries"][0]["attempt_log"]) == 1 for e in page)
    for w in (*workers, db):
        w.dispose()


def test_events_are_written_with_the_money_or_not_at_all(db: Database) -> None:
    """The outbox row shares the movement's transaction: a rolled-back hold leaves no event,
    a repeated top-up (same idempotency key) queues nothing new, no settings means no event."""
    account, _ = _configured_account(db, "https://hooks.example.com/x", usd=10)
    with db.write() as conn:
        notify.update(conn, account, {"low_balance_threshold_usd": "5"}, at_ms=clock.now_ms())
    with pytest.raises(RuntimeError), db.write() as conn:
        ledger.place_hold(conn, account, 6 * USD, idempotency_key="h1", ttl_ms=60_000,
                          at_ms=clock.now_ms())
        raise RuntimeError("the request failed before commit")
    with db.read() as conn:
        assert notify.events_page(conn, account)["data"] == []
    with db.write() as conn:
        hold = ledger.place_hold(conn, account, 6 * USD, idempotency_key="h2", ttl_ms=60_000,
                                 at_ms=clock.now_ms())
        ledger.void_hold(conn, hold.id, at_ms=clock.now_ms())  # back to 10: not re-armed
        ledger.place_hold(conn, account, 6 * USD, idempotency_key="h3", ttl_ms=60_000,
                          at_ms=clock.now_ms())
    for _ in range(2):
        with db.write() as conn:
            credits.topup(conn, account, USD, idempotency_key="same", at_ms=clock.now_ms())
    with db.read() as conn:
        types = [e["type"] for e in notify.events_page(conn, account)["data"]]
    assert types == ["balance.topup", "balance.low"]  # one low (h2), one top-up
    with db.write() as conn:
        other = account_store.create_account(conn, "quiet", "default", at_ms=1).id
        credits.topup(conn, other, USD, idempotency_key="quiet", at_ms=clock.now_ms())
        assert notify.events_page(conn, other)["data"] == []


def test_a_settlement_above_the_hold_can_cross(db: Database) -> None:
    """A charge larger than its hold takes the rest from the available balance: that debit
    crosses too. A threshold set while already below does not fire until re-armed."""
    account, _ = _configured_account(db, "https://hooks.example.com/x", usd=10)
    with db.write() as conn:
        notify.update(conn, account, {"low_balance_threshold_usd": "9.5"},
                      at_ms=clock.now_ms())
        hold = ledger.place_hold(conn, account, USD // 4, idempotency_key="a", ttl_ms=60_000,
                                 at_ms=clock.now_ms())
        ledger.settle_hold(conn, hold.id, USD, idempotency_key="a", at_ms=clock.now_ms())  # 10 -> 9
        notify.update(conn, account, {"low_balance_threshold_usd": "20"},
                      at_ms=clock.now_ms())  # already below: disarmed
        ledger.adjust(conn, account, -USD, idempotency_key="b", note="x", at_ms=clock.now_ms())
    with db.read() as conn:
        [low] = notify.events_page(conn, account)["data"]
    assert json.loads(low["body"])["data"] == {"available_usd": "9.000000000",
                                               "threshold_usd": "9.500000000"}


def test_the_signing_helper_matches_the_documented_scheme() -> None:
    body = b'{"id":"evt_1"}'
    header = signing.signature("whsec_x", 1_700_000_000, body)
    assert header == "v1=" + hmac.new(b"whsec_x", b"1700000000." + body,
                                      hashlib.sha256).hexdigest()
    assert signing.verify("whsec_x", header, "1700000000", body, now_s=1_700_000_299)
    assert not signing.verify("whsec_x", header, "1700000000", body, now_s=1_700_000_301)
    assert not signing.verify("whsec_y", header, "1700000000", body, now_s=1_700_000_000)
    assert not signing.verify("whsec_x", header, "1700000000", body + b" ", now_s=1_700_000_000)


# --------------------------------------------------------------------------- email


class _SmtpSink(socketserver.StreamRequestHandler):
    """Just enough SMTP to accept one message (no TLS, no auth)."""
    messages: list[bytes] = []

    def handle(self) -> None:
        self.wfile.write(b"220 sink ESMTP\r\n")
        data: list[bytes] = []
        while line := self.rfile.readline():
            command = line.strip().upper()
            if command.startswith((b"EHLO", b"HELO")):
                self.wfile.write(b"250 sink\r\n")
            elif command == b"DATA":
                self.wfile.write(b"354 go on\r\n")
                while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                    data.append(chunk)
                type(self).messages.append(b"".join(data))
                self.wfile.write(b"250 queued\r\n")
            elif command == b"QUIT":
                self.wfile.write(b"221 bye\r\n")
                return
            else:
                self.wfile.write(b"250 ok\r\n")


def test_email_is_sent_through_smtp(db: Database) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SmtpSink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _SmtpSink.messages = []
    try:
        with db.write() as conn:
            account = account_store.create_account(conn, "mailed", "default", at_ms=1).id
            notify.update(conn, account, {"email": "owner@example.com"}, at_ms=1)
            credits.topup(conn, account, 3 * USD, idempotency_key="m", at_ms=clock.now_ms())
        port = server.server_address[1]
        policy = Policy(smtp_url=f"smtp://127.0.0.1:{port}", email_from="billing@tollway.test",
                        retry_base_ms=0)
        assert deliver(db, policy) == 1
    finally:
        server.shutdown()
        server.server_close()
    [message] = _SmtpSink.messages
    text = message.decode()
    assert "To: owner@example.com" in text and "From: billing@tollway.test" in text
    assert "Subject: Your Tollway balance was topped up" in text
    assert "3.000000000 USD was added to account" in text
    with db.read() as conn:
        [event] = notify.events_page(conn, account)["data"]
    assert event["deliveries"][0]["channel"] == "email"
    assert event["deliveries"][0]["status"] == "delivered"


def test_the_cli_sets_up_and_delivers(db_url: str, receiver: Receiver,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TOLLWAY_NOTIFY_ALLOW_PRIVATE_TARGETS", "true")
    base = ["--database-url", db_url]
    assert cli.main([*base, "accounts", "create", "carol"]) == 0
    assert cli.main([*base, "--json", "notify", "settings", "carol", "--threshold", "2.5",
                     "--url", receiver.url]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--json", "notify", "settings", "carol"]) == 0
    settings = json.loads(capsys.readouterr().out)
    assert settings["low_balance_threshold_usd"] == "2.500000000"
    assert settings["webhook_url"] == receiver.url
    assert cli.main([*base, "topup", "carol", "3"]) == 0
    assert cli.main([*base, "adjust", "carol", "-1", "--note", "test"]) == 0  # 3 -> 2: low
    capsys.readouterr()
    assert cli.main([*base, "--json", "notify", "deliver"]) == 0
    assert json.loads(capsys.readouterr().out) == {"attempted": 2}
    events = [check_signature(settings["webhook_secret"], r) for r in receiver.received]
    assert sorted((e["type"], e["data"]["available_usd"]) for e in events) == [
        ("balance.low", "2.000000000"), ("balance.topup", "3.000000000")]  # sent concurrently
    assert cli.main([*base, "notify", "list", "carol"]) == 0
    assert capsys.readouterr().out.count("delivered") == 2
    assert cli.main([*base, "notify", "settings", "carol", "--url", "none"]) == 0
    assert "webhook URL:           none" in capsys.readouterr().out


def test_the_server_delivers_in_the_background(tmp_path: Path, receiver: Receiver) -> None:
    """The deliverer started with the app (lifespan) sends without anyone asking."""
    db = Database(f"sqlite:///{tmp_path / 'bg.db'}")
    upgrade(db)
    env = {**GATEWAY_ENV, "TOLLWAY_NOTIFY_INTERVAL_SECONDS": "0.05",
           "TOLLWAY_NOTIFY_ALLOW_PRIVATE_TARGETS": "true"}
    with running_tollway(db, CATALOG.read_text(), env=env) as tw:
        account = tw.account(usd=None)
        http = tw.http()
        secret = http.put(f"/admin/v1/accounts/{account}/notifications/settings",
                          headers=ADMIN, json={"webhook_url": receiver.url}).json()[
            "webhook_secret"]
        assert http.post(f"/admin/v1/accounts/{account}/topups", headers=ADMIN,
                         json={"amount_usd": "4.5"}).status_code == 201
        deadline = time.monotonic() + 20
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.02)
    [got] = receiver.received
    assert check_signature(secret, got)["data"]["amount_usd"] == "4.500000000"
    db.dispose()


_examples = itertools.count()
_money = st.one_of(st.integers(1, 3 * USD), st.sampled_from([USD // 2, USD, 2 * USD]))
_op = st.one_of(st.tuples(st.just("topup"), _money), st.tuples(st.just("hold"), _money),
                st.tuples(st.just("hold"), _money),
                st.tuples(st.just("settle"), st.integers(0, 150)),
                st.tuples(st.just("void"), st.just(0)),
                st.tuples(st.just("adjust"), st.integers(-2 * USD, 2 * USD).filter(bool)))


def test_low_balance_events_follow_the_arming_rule(db: Database) -> None:
    """Any sequence of top-ups, holds, settlements (under and over the hold), voids and
    adjustments: a ``balance.low`` exactly when an armed wallet's available balance goes from
    >= threshold to below it by a debit, re-armed only by money coming in."""
    @settings(max_examples={"sqlite": 40, "postgresql": 15}[db.dialect], deadline=None,
              database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(opening=st.integers(0, 6 * USD), threshold=st.integers(1, 5 * USD),
           ops=st.lists(_op, min_size=5, max_size=30))
    def run(opening: int, threshold: int, ops: list[tuple[str, int]]) -> None:
        n = next(_examples)
        with db.write() as conn:
            account = account_store.create_account(conn, f"p{n}", "default", at_ms=1).id
            if opening:
                ledger.topup(conn, account, opening, idempotency_key=f"p{n}-open",
                             at_ms=clock.now_ms())
            notify.update(conn, account, {"webhook_url": "https://hooks.example.com/",
                                          "low_balance_threshold_usd": format_usd(threshold)},
                          at_ms=1)
        armed, expected, holds = opening >= threshold, [], []
        for i, (kind, value) in enumerate(ops):
            key = f"p{n}-{i}"
            with db.write() as conn:
                before = account_store.get_account(conn, account).available_nano
                try:
                    if kind == "topup":
                        ledger.topup(conn, account, value, idempotency_key=key,
                                     at_ms=clock.now_ms())
                    elif kind == "hold":
                        holds.append(ledger.place_hold(conn, account, value,
                                                       idempotency_key=key, ttl_ms=60_000,
                                                       at_ms=clock.now_ms()))
                    elif kind == "settle" and holds:
                        hold = holds.pop()
                        ledger.settle_hold(conn, hold.id, hold.amount_nano * value // 100,
                                           idempotency_key=key, at_ms=clock.now_ms())
                    elif kind == "void" and holds:
                        ledger.void_hold(conn, holds.pop().id, at_ms=clock.now_ms())
                    elif kind == "adjust":
                        ledger.adjust(conn, account, value, idempotency_key=key, note="p",
                                      at_ms=clock.now_ms())
                except InsufficientBalance:
                    continue
                after = account_store.get_account(conn, account).available_nano
            money_in = kind == "topup" or kind == "adjust" and value > 0
            if after < before and armed and after < threshold <= before:
                expected.append(format_usd(after))
                armed = False
            elif money_in and after >= threshold:
                armed = True
        with db.read() as conn:
            events = notify.events_page(conn, account, limit=100)["data"]
        assert [json.loads(e["body"])["data"]["available_usd"] for e in reversed(events)
                if e["type"] == "balance.low"] == expected

    run()
