"""No overdraft and exactly-once under concurrency, on SQLite and PostgreSQL.

Every racer has its own database connection (``Database(url, null_pool=True)``: each
``with db.write()`` opens a fresh one), as separate gateway workers would. The PostgreSQL-only
tests at the end force a specific interleaving of two transactions: one holds a row lock
while the other is parked waiting for it (seen in ``pg_stat_activity``), then the first
commits.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from test_ledger import balances, new_account

from tollway import clock
from tollway.errors import InsufficientBalance
from tollway.ledger import ledger
from tollway.ledger.ledger import Release, Settlement, Topup
from tollway.ledger.verify import verify
from tollway.store.db import Database
from tollway.store.tables import entries, postings
from tollway.store.writer import Writer

USD = 1_000_000_000
HOUR_MS = 3_600_000
X = 70_000_003  # one hold: $0.070000003
FITS = 57  # the balance covers exactly this many holds of X
RACERS = 200

postgresql_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


# --------------------------------------------------------------------------- helpers


def assert_verified(db: Database) -> None:
    with db.read() as conn:
        assert verify(conn) == []


def run_threads(n: int, target: Any) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
        assert not t.is_alive()


def outcome_counts(outcomes: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return counts


def wait_for_lock_waiters(db: Database, n: int) -> None:
    """Until ``n`` sessions of this PostgreSQL database are blocked on a lock."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with db.engine.connect() as conn:
            waiting = conn.execute(sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'")).scalar_one()
        if waiting >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"{n} session(s) never blocked on a lock")


# --------------------------------------------------------------------------- no overdraft


def test_200_threads_race_for_57_holds(db_url: str) -> None:
    setup = Database(db_url)
    racers = Database(db_url, null_pool=True)
    try:
        alice = new_account(setup, topup_nano=FITS * X)
        assert balances(setup, alice) == (3_990_000_171, 0)
        barrier = threading.Barrier(RACERS)
        outcomes: list[Any] = [None] * RACERS

        def race(i: int) -> None:
            try:
                barrier.wait(timeout=60)
                with racers.write() as conn:
                    ledger.place_hold(conn, alice, X, idempotency_key=f"race-{i}",
                                      ttl_ms=HOUR_MS, at_ms=clock.now_ms())
                outcomes[i] = "ok"
            except InsufficientBalance:
                outcomes[i] = "insufficient"
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcomes[i] = f"error: {exc!r}"

        run_threads(RACERS, race)
        assert outcome_counts(outcomes) == {"ok": 57, "insufficient": 143}
        assert balances(setup, alice) == (0, 3_990_000_171)
        assert_verified(setup)
    finally:
        racers.dispose()
        setup.dispose()


CHILD = r"""
import json, sys, threading
from tollway import clock
from tollway.errors import InsufficientBalance
from tollway.ledger import ledger
from tollway.store.db import Database

url, account, amount, prefix, n = sys.argv[1:6]
account, amount, n = int(account), int(amount), int(n)
db = Database(url, null_pool=True)
barrier = threading.Barrier(n + 1)
out = [None] * n

def race(i):
    barrier.wait(timeout=60)
    try:
        with db.write() as conn:
            ledger.place_hold(conn, account, amount, idempotency_key=f"{prefix}-{i}",
                              ttl_ms=3_600_000, at_ms=clock.now_ms())
        out[i] = "ok"
    except InsufficientBalance:
        out[i] = "insufficient"
    except Exception as exc:
        out[i] = f"error: {exc!r}"

threads = [threading.Thread(target=race, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.readline()  # the parent releases every process at once
barrier.wait(timeout=60)
for t in threads:
    t.join()
print(json.dumps(out), flush=True)
"""


@postgresql_only
def test_4_processes_of_50_threads_race_for_57_holds(db_url: str) -> None:
    setup = Database(db_url)
    try:
        alice = new_account(setup, topup_nano=FITS * X)
        procs = [subprocess.Popen(
            [sys.executable, "-c", CHILD, db_url, str(alice), str(X), f"p{p}", "50"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for p in range(4)]
        try:
            for proc in procs:
                assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            for proc in procs:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            outcomes: list[str] = []
            for proc in procs:
                out, err = proc.communicate(timeout=120)
                assert proc.returncode == 0, err
                outcomes += json.loads(out)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert outcome_counts(outcomes) == {"ok": 57, "insufficient": 143}
        assert balances(setup, alice) == (0, 3_990_000_171)
        assert_verified(setup)
    finally:
        setup.dispose()


# --------------------------------------------------------------------------- exactly once


def test_50_writers_repeating_one_topup_credit_it_once(db_url: str) -> None:
    """Fifty gateway workers (each its own Writer, each batch its own connection) submit the
    same top-up at once. On PostgreSQL they are all inside their transactions before any of
    them commits, so the losers hit the unique idempotency key and the writer's retry must
    hand them the winner's result."""
    setup = Database(db_url)
    shared = Database(db_url, null_pool=True)
    n = 50
    writers = [Writer(shared) for _ in range(n)]
    try:
        alice = new_account(setup)
        on_postgresql = shared.dialect == "postgresql"
        start = threading.Barrier(n)
        # SQLite serialises write transactions (BEGIN IMMEDIATE): only one can be inside
        inside = threading.Barrier(n) if on_postgresql else None
        calls = itertools.count()
        results: list[Any] = [None] * n

        def worker(i: int) -> None:
            first = True

            def op(conn: Any) -> Topup:
                nonlocal first
                next(calls)
                if inside is not None and first:
                    first = False
                    inside.wait(timeout=60)
                return ledger.topup(conn, alice, 7 * USD, idempotency_key="same",
                                    at_ms=clock.now_ms())

            try:
                start.wait(timeout=60)
                results[i] = writers[i].call(op)
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                results[i] = exc

        run_threads(n, worker)
    finally:
        for w in writers:
            w.close()
        shared.dispose()
    try:
        assert all(isinstance(r, Topup) for r in results), results
        assert len(set(results)) == 1
        assert results[0].amount_nano == 7_000_000_000
        assert results[0].balance_nano == 7_000_000_000
        assert balances(setup, alice) == (7_000_000_000, 0)
        with setup.read() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(entries)).scalar() == 1
            assert conn.execute(sa.select(sa.func.count()).select_from(postings)).scalar() == 2
        made = next(calls)
        if on_postgresql:
            assert made > n  # some losers did hit the unique violation and were retried
        else:
            assert made == n
        assert_verified(setup)
    finally:
        setup.dispose()


@postgresql_only
def test_writer_retry_after_unique_violation_returns_the_first_result(db_url: str) -> None:
    """Deterministic version of the race above: a direct transaction has written the top-up
    but not committed; a writer's copy of it blocks on the wallet row, then (after the commit)
    hits the unique idempotency key, and the retry returns the committed result."""
    db = Database(db_url)
    writer_db = Database(db_url, null_pool=True)
    writer = Writer(writer_db)
    calls = itertools.count()

    def op(conn: Any) -> Topup:
        next(calls)
        return ledger.topup(conn, alice, 3 * USD, idempotency_key="same", at_ms=clock.now_ms())

    try:
        alice = new_account(db)
        with db.write() as conn:
            first = ledger.topup(conn, alice, 3 * USD, idempotency_key="same", at_ms=clock.now_ms())
            pending = writer.submit(op)
            wait_for_lock_waiters(db, 1)
        assert pending.result(30) == first
        assert next(calls) == 2  # the unique violation, then the retry
        assert balances(db, alice) == (3_000_000_000, 0)
        assert_verified(db)
    finally:
        writer.close()
        writer_db.dispose()
        db.dispose()


# --------------------------------------------------------------------------- interleavings


@postgresql_only
def test_settle_overrun_racing_a_new_hold_never_overdraws(db_url: str) -> None:
    """A settlement that costs more than its hold takes the rest from the available balance.
    If another request's hold took that balance meanwhile, the settlement must see it (and
    write off what is missing), not fail or overdraw."""
    db = Database(db_url)
    try:
        alice = new_account(db, topup_nano=10 * USD)
        with db.write() as conn:
            hold = ledger.place_hold(conn, alice, 4 * USD, idempotency_key="h1", ttl_ms=HOUR_MS,
                                     at_ms=clock.now_ms())
        outcome: dict[str, Any] = {}

        def settle() -> None:
            try:
                with db.write() as conn:
                    outcome["settlement"] = ledger.settle_hold(conn, hold.id, 9 * USD,
                                                               idempotency_key="s1",
                                                               at_ms=clock.now_ms())
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

        with db.write() as conn:
            ledger.place_hold(conn, alice, 5 * USD, idempotency_key="h2", ttl_ms=HOUR_MS,
                              at_ms=clock.now_ms())
            settler = threading.Thread(target=settle)
            settler.start()
            wait_for_lock_waiters(db, 1)
        settler.join(30)
        # 4 from the hold, the 1 USD left available, 4 written off; h2's 5 USD untouched
        assert outcome == {"settlement": Settlement(hold.id, 9_000_000_000, 4_000_000_000,
                                                    1_000_000_000, 4_000_000_000, 0)}
        assert balances(db, alice) == (0, 5_000_000_000)
        assert_verified(db)
    finally:
        db.dispose()


@postgresql_only
def test_reaper_racing_a_late_settlement_skips_that_hold_only(db_url: str) -> None:
    """The reaper picks two expired holds; one of them is being settled by a request that
    finished just in time. The settlement wins that hold, the reaper still expires the other
    (and does not fail its whole batch)."""
    db = Database(db_url)
    try:
        alice = new_account(db, topup_nano=1 * USD)
        with db.write() as conn:
            h1 = ledger.place_hold(conn, alice, 300_000_000, idempotency_key="h1", ttl_ms=0,
                                   at_ms=clock.now_ms())
            h2 = ledger.place_hold(conn, alice, 200_000_000, idempotency_key="h2", ttl_ms=0,
                                   at_ms=clock.now_ms())
        outcome: dict[str, Any] = {}

        def reap() -> None:
            try:
                with db.write() as conn:
                    outcome["released"] = ledger.expire_holds(
                        conn, now=max(h1.expires_at_ms, h2.expires_at_ms))
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                outcome["error"] = exc

        with db.write() as conn:
            ledger.settle_hold(conn, h1.id, 100_000_000, idempotency_key="s1", at_ms=clock.now_ms())
            reaper = threading.Thread(target=reap)
            reaper.start()
            wait_for_lock_waiters(db, 1)
        reaper.join(30)
        assert outcome == {"released": [Release(h2.id, 200_000_000, "expired")]}
        assert balances(db, alice) == (900_000_000, 0)
        assert_verified(db)
    finally:
        db.dispose()
