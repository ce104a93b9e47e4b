"""The writer's batches on both backends; on PostgreSQL they run pipelined
(``store/pipeline.py``): what a caller sees must not change.

Each test holds the writer on a first operation until the others are queued, so that they
share one batch (one transaction, one pipeline), and counts the transactions rolled back: a
batch whose optimistic run failed is rolled back and re-run with savepoints, which would
hide a wrong answer of the pipelined run.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection

from tollway import clock
from tollway.ledger import ledger
from tollway.store.accounts import create_account
from tollway.store.db import INTEGRITY_ERRORS, Database
from tollway.store.prepared import Prepared
from tollway.store.tables import accounts
from tollway.store.writer import Writer

_NEW_ACCOUNT = Prepared(accounts.insert().values(
    name=sa.bindparam("name"), kind="customer", group_name="default", created_at_ms=0))


def _one_batch(writer: Writer, ops: list[Callable[[Connection], Any]]) -> list[Future[Any]]:
    """Submit ``ops`` so that they run in one batch, in this order (one account each)."""
    gate = threading.Event()
    started = threading.Event()

    def hold_the_writer(conn: Connection) -> None:
        started.set()
        assert gate.wait(10)

    first = writer.submit(hold_the_writer)
    assert started.wait(10)
    futures = [writer.submit(op, account_id=i) for i, op in enumerate(ops)]
    gate.set()
    first.result(10)
    return futures


def _rollbacks(db: Database) -> list[int]:
    """A counter of the transactions the writer's engine rolls back from now on."""
    counted = [0]

    def rolled_back(conn: Connection) -> None:
        counted[0] += 1

    event.listen(db.write_engine, "rollback", rolled_back)
    return counted


def _account(db: Database, name: str, usd: int = 0) -> int:
    with db.write() as conn:
        account_id = create_account(conn, name, "default", at_ms=clock.now_ms()).id
        if usd:
            ledger.topup(conn, account_id, usd * 10**9, idempotency_key=f"seed-{name}",
                         at_ms=clock.now_ms())
    return account_id


def _available(conn: Connection, account_id: int) -> int:
    return int(conn.execute(sa.select(accounts.c.available_nano)
                            .where(accounts.c.id == account_id)).scalar_one())


def test_reads_in_a_batch_see_the_writes_before_them(db: Database) -> None:
    """SQLAlchemy reads (and their row counts) between pipelined writes answer as if each
    statement had been waited for."""
    a = _account(db, "a", usd=1)
    writer = Writer(db)
    rollbacks = _rollbacks(db)
    try:
        futures = _one_batch(writer, [
            lambda conn: ledger.topup(conn, a, 250, idempotency_key="t1",
                                      at_ms=clock.now_ms()).balance_nano,
            lambda conn: _available(conn, a),
            lambda conn: conn.execute(accounts.update().where(accounts.c.id == a)
                                      .values(requests=accounts.c.requests + 7)).rowcount,
            lambda conn: conn.execute(sa.select(accounts.c.requests)
                                      .where(accounts.c.id == a)).scalar_one(),
        ])
        assert [f.result(10) for f in futures] == [1_000_000_250, 1_000_000_250, 1, 7]
        assert rollbacks == [0]  # answered by the optimistic (pipelined) run itself
    finally:
        writer.close()
    with db.read() as conn:
        assert _available(conn, a) == 1_000_000_250


def test_a_failed_write_nobody_read_fails_its_own_operation_only(db: Database) -> None:
    """A unique-key violation of a statement whose result is never read surfaces, on
    PostgreSQL, only when the batch's pipeline is synced: the batch is re-run with a savepoint
    per operation, the failing operation's caller gets the error and the others commit."""
    a = _account(db, "a", usd=1)
    _account(db, "taken")
    writer = Writer(db)
    rollbacks = _rollbacks(db)
    try:
        futures = _one_batch(writer, [
            lambda conn: ledger.topup(conn, a, 5, idempotency_key="before",
                                      at_ms=clock.now_ms()).balance_nano,
            lambda conn: ledger.topup(conn, a, 7, idempotency_key="after",
                                      at_ms=clock.now_ms()).balance_nano,
            # last: no statement is read after it, so on PostgreSQL the error comes at the sync
            lambda conn: _NEW_ACCOUNT.execute(conn, {"name": "taken"}) and "sent",
        ])
        assert futures[0].result(10) == 1_000_000_005
        assert futures[1].result(10) == 1_000_000_012
        with pytest.raises(INTEGRITY_ERRORS):
            futures[2].result(10)
        assert rollbacks == [1]  # the optimistic run; the re-run committed
        # The connection is back to normal: the next batch commits.
        assert writer.call(lambda conn: ledger.topup(
            conn, a, 1, idempotency_key="next", at_ms=clock.now_ms()).balance_nano) \
            == 1_000_000_013
    finally:
        writer.close()
    with db.read() as conn:
        assert _available(conn, a) == 1_000_000_013
        assert conn.execute(sa.select(sa.func.count()).select_from(accounts)
                            .where(accounts.c.name == "taken")).scalar_one() == 1


def test_an_operation_that_raises_rolls_back_alone(db: Database) -> None:
    """An operation's own exception (after pipelined writes of its own) reaches its caller;
    its writes are undone, the batch's other operations commit."""
    a = _account(db, "a", usd=1)
    writer = Writer(db)

    def topup_then_raise(conn: Connection) -> None:
        ledger.topup(conn, a, 1000, idempotency_key="undone", at_ms=clock.now_ms())
        raise ValueError("changed my mind")

    try:
        futures = _one_batch(writer, [
            topup_then_raise,
            lambda conn: ledger.topup(conn, a, 3, idempotency_key="kept",
                                      at_ms=clock.now_ms()).balance_nano,
        ])
        with pytest.raises(ValueError, match="changed my mind"):
            futures[0].result(10)
        assert futures[1].result(10) == 1_000_000_003
    finally:
        writer.close()
    with db.read() as conn:
        assert _available(conn, a) == 1_000_000_003
