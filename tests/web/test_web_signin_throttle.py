"""The console sign-in throttle, on SQLite and PostgreSQL: after 5 failed sign-ins within 900 s
(the defaults) for one login or one client address, the 6th attempt is refused with 429 and
``Retry-After`` before the password is checked, even the right one; it works again once the
oldest failure leaves the window; a success clears its login's count; the operator form counts
by address; two instances on one database share the counts. Time comes from the app's clock,
which the tests move (no sleeping)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from tollway.app import create_app
from tollway.billing import logins
from tollway.clock import now_ms
from tollway.store.db import Database
from tollway.store.tables import signin_failures
from webclient import TestClient, login, operator_login

ADMIN_TOKEN = "adm-throttle"
PASSWORD = "correct horse battery"
WRONG = "wrong horse battery"
WINDOW_MS = 900_000


class Clock:
    def __init__(self) -> None:
        self.ms = now_ms()

    def __call__(self) -> int:
        return self.ms


@contextmanager
def serving_clients(db: Database, clock: Clock, *ips: str) -> Iterator[list[TestClient]]:
    """One app on ``db``, with one client per address."""
    app = create_app(database_url=db.url, admin_token=ADMIN_TOKEN, clock=clock)
    clients = [TestClient(app, client=(ip, 50000)) for ip in ips]
    with clients[0]:
        yield clients


def make_accounts(db: Database, *names: str) -> None:
    with db.write() as conn:
        for name in names:
            logins.create_account(conn, name, "default", email=f"{name}@example.com",
                                  password_hash=logins.hash_password(PASSWORD))


def failures(db: Database, scope: str) -> list[int]:
    f = signin_failures.c
    with db.read() as conn:
        return list(conn.execute(sa.select(f.at_ms).where(f.scope == scope)
                                 .order_by(f.at_ms)).scalars())


def assert_throttled(response: object, retry_after: int) -> None:
    assert response.status_code == 429, response.text[:300]  # type: ignore[attr-defined]
    assert response.headers["retry-after"] == str(retry_after)  # type: ignore[attr-defined]
    assert "Too many failed sign-ins" in response.text  # type: ignore[attr-defined]


def test_the_sixth_attempt_is_refused_until_the_oldest_failure_leaves_the_window(
        db: Database) -> None:
    make_accounts(db, "alice")
    clock = Clock()
    start = clock.ms
    with serving_clients(db, clock, "198.51.100.7", "198.51.100.8") as (client, other):
        for i in range(5):
            clock.ms = start + i * 1000
            assert login(client, "alice", WRONG).status_code == 401
        assert failures(db, "login:alice") == [start + i * 1000 for i in range(5)]
        assert failures(db, "ip:198.51.100.7") == [start + i * 1000 for i in range(5)]
        clock.ms = start + 10_000
        # the right password too: no password is checked while locked, and nothing is counted
        response = login(client, "alice", PASSWORD)
        assert_throttled(response, (WINDOW_MS - 10_000) // 1000)  # 890 s
        assert "tollway_session" not in client.cookies
        # the login is locked from any address
        assert_throttled(login(other, "alice", PASSWORD), 890)
        assert len(failures(db, "login:alice")) == 5
        clock.ms = start + WINDOW_MS - 1  # 1 ms to go: rounded up to a whole second
        assert_throttled(login(client, "alice", PASSWORD), 1)
        clock.ms = start + WINDOW_MS  # the first failure has left the window: 4 remain
        response = login(client, "alice", PASSWORD)
        assert response.status_code == 303
        assert "tollway_session" in client.cookies
        # a success clears the login's count (not the address's: 4 remain there; the
        # expired one was deleted by the attempt)
        assert failures(db, "login:alice") == []
        assert len(failures(db, "ip:198.51.100.7")) == 4
        for _ in range(5):
            assert login(other, "alice", WRONG).status_code == 401
        assert_throttled(login(other, "alice", PASSWORD), 900)


def test_an_address_over_the_limit_is_refused_for_every_login(db: Database) -> None:
    make_accounts(db, "alice")
    clock = Clock()
    with serving_clients(db, clock, "203.0.113.9", "203.0.113.10") as (client, other):
        for name in ("bob", "carol", "alice@example.com", "nobody", "101"):
            assert login(client, name, WRONG).status_code == 401
        clock.ms += 60_000
        assert_throttled(login(client, "alice", PASSWORD), 840)
        # alice's own count is 1 (her email, normalized), so another address signs her in
        assert failures(db, "login:alice@example.com") == [clock.ms - 60_000]
        assert login(other, "ALICE@Example.com", PASSWORD).status_code == 303
        assert login(other, "alice", PASSWORD).status_code == 303


def test_the_operator_form_is_limited_by_address(db: Database) -> None:
    clock = Clock()
    with serving_clients(db, clock, "192.0.2.1", "192.0.2.2") as (client, other):
        for i in range(5):
            clock.ms += 1000
            assert operator_login(client, f"guess-{i}").status_code == 401
        assert_throttled(operator_login(client, ADMIN_TOKEN), 896)
        assert "tollway_session" not in client.cookies
        assert operator_login(other, ADMIN_TOKEN).status_code == 303


def test_two_instances_on_one_database_share_the_counts(db: Database) -> None:
    make_accounts(db, "alice")
    clock = Clock()
    with serving_clients(db, clock, "198.51.100.20") as (one,), \
            serving_clients(db, clock, "198.51.100.21") as (two,):
        for client in (one, two, one, two, one):
            assert login(client, "alice", WRONG).status_code == 401
        assert_throttled(login(two, "alice", PASSWORD), 900)
        assert_throttled(login(one, "alice", PASSWORD), 900)


def test_failures_older_than_the_window_are_forgotten(db: Database) -> None:
    clock = Clock()
    with db.write() as conn:
        conn.execute(signin_failures.insert(), [
            {"scope": "login:old", "at_ms": clock.ms - WINDOW_MS - 1},
            {"scope": "login:old", "at_ms": clock.ms - WINDOW_MS},
            {"scope": "login:recent", "at_ms": clock.ms - WINDOW_MS + 1}])
    with serving_clients(db, clock, "198.51.100.30") as (client,):
        assert login(client, "someone", WRONG).status_code == 401
    assert failures(db, "login:old") == []
    assert failures(db, "login:recent") == [clock.ms - WINDOW_MS + 1]
    assert failures(db, "login:someone") == [clock.ms]


def test_migration_0007_matches_the_table_and_downgrades(db: Database) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tollway.store.migrate import alembic_config, current_revision, head_revision, upgrade
    from tollway.store.tables import metadata

    def drift() -> list[object]:
        with db.read() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        return [d for d in diffs if "signin_failures" in repr(d)]

    assert current_revision(db) == head_revision() and drift() == []
    with db.write() as conn:
        conn.execute(signin_failures.insert().values(scope="ip:192.0.2.1", at_ms=1))
    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0006")
    assert current_revision(db) == "0006"
    with db.read() as conn:
        assert not sa.inspect(conn).has_table("signin_failures")
    upgrade(db)
    assert current_revision(db) == head_revision() and drift() == []


# ----------------------------------------------------------------------------- issue 15


def test_concurrent_wrong_guesses_never_exceed_the_limit(db: Database) -> None:
    """Check and count are one write (``signin.claim``): 12 wrong guesses racing at three
    served Tollways on one database get exactly 5 password checks (401) and 7 refusals
    (429), on both backends."""
    import threading

    import httpx

    from fakes import GatewayThread
    from webclient import _CSRF

    make_accounts(db, "alice")
    # three instances: each serialises its own writes, so the race is between instances
    gateways = [GatewayThread(db.url, admin_token=ADMIN_TOKEN) for _ in range(3)]
    for gateway in gateways:
        gateway.start()
    try:
        clients = [httpx.Client(base_url=gateways[i % 3].url, timeout=60) for i in range(12)]
        tokens = []
        for client in clients:
            found = _CSRF.search(client.get("/login").text)
            assert found
            tokens.append(found.group(1))
        barrier = threading.Barrier(len(clients))
        statuses: list[int] = []

        def guess(client: httpx.Client, token: str) -> None:
            barrier.wait()
            statuses.append(client.post("/login", data={
                "csrf_token": token, "login": "alice", "password": WRONG}).status_code)

        threads = [threading.Thread(target=guess, args=pair) for pair in zip(clients, tokens,
                                                                              strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for client in clients:
            client.close()
    finally:
        for gateway in gateways:
            gateway.stop()
    assert sorted(statuses) == [401] * 5 + [429] * 7
    assert len(failures(db, "login:alice")) == 5
    assert len(failures(db, "ip:127.0.0.1")) == 5


def test_clients_without_an_address_are_counted_together(db: Database) -> None:
    """A peer with no IP address (TestClient's ``testclient``, a Unix socket) is not let off:
    all such clients share one count, on the customer and the operator form."""
    make_accounts(db, "alice", "bob")
    clock = Clock()
    app = create_app(database_url=db.url, admin_token=ADMIN_TOKEN, clock=clock)
    with TestClient(app) as client:  # its peer is "testclient": no IP address
        for name in ("alice", "bob", "carol", "dave", "erin"):
            assert login(client, name, WRONG).status_code == 401
        assert len(failures(db, "ip:unknown")) == 5
        assert_throttled(login(client, "frank", WRONG), 900)
        refused = operator_login(client, ADMIN_TOKEN)
        assert refused.status_code == 429


def test_signup_is_throttled_per_address(db: Database,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every POST to /signup counts against its address: the 6th within the hour is 429 with
    Retry-After, before any account is made; another address is not affected."""
    from webclient import post_form

    monkeypatch.setenv("TOLLWAY_SIGNUP_ENABLED", "true")
    clock = Clock()
    start = clock.ms
    with serving_clients(db, clock, "198.51.100.40", "198.51.100.41") as (client, other):
        for i in range(5):
            clock.ms = start + i * 1000
            client.cookies.clear()
            made = post_form(client, "/signup", {"name": f"new{i}", "email": f"n{i}@example.com",
                                                 "password": PASSWORD})
            assert made.status_code == 303, made.text[:300]
        client.cookies.clear()
        refused = post_form(client, "/signup", {"name": "new5", "email": "n5@example.com",
                                                "password": PASSWORD})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(3600 - 4)
        assert "Too many sign-ups" in refused.text
        with db.read() as conn:
            assert logins.authenticate(conn, "new5", PASSWORD) is None
        made = post_form(other, "/signup", {"name": "new6", "email": "n6@example.com",
                                            "password": PASSWORD})
        assert made.status_code == 303
        clock.ms = start + 3_600_000  # the first sign-up has left the window
        client.cookies.clear()
        again = post_form(client, "/signup", {"name": "new7", "email": "n7@example.com",
                                              "password": PASSWORD})
        assert again.status_code == 303
    assert len(failures(db, "signup:198.51.100.40")) == 5
