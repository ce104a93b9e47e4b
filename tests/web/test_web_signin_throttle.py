"""The console sign-in throttle, on SQLite and PostgreSQL: after 5 failed sign-ins within 900 s
(the defaults) for one login or one client address, the 6th attempt is refused with 429 and
``Retry-After`` before the password is checked, even the right one; it works again once the
oldest failure leaves the window; a success clears its login's count; the operator form counts
by address; two instances on one database share the counts. Time comes from the app's clock,
which the tests move (no sleeping)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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
        # a success clears the login's count (not the address's: 4 remain there)
        assert failures(db, "login:alice") == []
        assert len(failures(db, "ip:198.51.100.7")) == 5
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
