"""The single writer: every money movement of a process goes through one thread that runs
queued operations in shared transactions (Datasette's pattern, TigerBeetle's batching).

Batching turns N commits (N fsyncs) into one without weakening anything: an operation that
raises (say, insufficient balance) is rolled back alone and the rest of the batch commits
(the batch is re-run with a SAVEPOINT per operation when that happens), and no caller hears
"done" before its batch is durable. Results go back to asyncio callers with one wake-up of
their event loop per batch, not one per operation. On PostgreSQL a batch that loses a
deadlock or a serialization race is retried whole, which is safe because every ledger
operation is idempotent.

On PostgreSQL the optimistic run of a batch is pipelined (:mod:`tollway.store.pipeline`):
statements whose results are not read go out without a round trip each. The replay with
savepoints is not: there every error must reach its own operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from tollway.metrics import METRICS
from tollway.store.db import INTEGRITY_ERRORS, OPERATIONAL_ERRORS, Database, storage_error
from tollway.store.pipeline import Failed, pipelined

T = TypeVar("T")
Operation = Callable[[Connection], Any]
#: Where a result goes: a concurrent Future (threads) or an asyncio future and its loop.
Target = Future[Any] | tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]
Outcome = tuple[bool, Any]  # (succeeded, result or exception)
_STOP = object()
_RETRIES = 5
_LAST = 2**63


class Writer:
    def __init__(self, db: Database, *, max_batch: int = 512) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: The writer's own connection, kept between batches (see ``_transaction``)
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="tollway-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[Connection], T], *, account_id: int | None = None
               ) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((_order(account_id), op, future))
        return future

    def call(self, op: Callable[[Connection], T], *, account_id: int | None = None) -> T:
        """Run ``op`` in the next batch and wait for its durable result (sync callers)."""
        return self.submit(op, account_id=account_id).result()

    async def run(self, op: Callable[[Connection], T], *, account_id: int | None = None) -> T:
        """Run ``op`` in the next batch without blocking the event loop. ``account_id`` names
        the account whose rows the operation locks (see :func:`_order`).

        If the caller is cancelled, the operation still runs (or has run): its result is
        dropped, which for a ledger operation means a hold the reaper later releases.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((_order(account_id), op, (loop, future)))
        return await future

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self._conn is not None:
                self._conn.close()

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                batch.append(nxt)
            live = [(op, target) for _, op, target in
                    sorted(batch, key=_by_order) if _claim(target)]
            try:
                outcomes = self._execute([op for op, _ in live])
            except BaseException as exc:  # noqa: BLE001 - never let the writer thread die
                # Callers hear 503 storage_unavailable for a database that cannot be reached.
                outcomes = [(False, storage_error(exc) or exc)] * len(live)
            _deliver([target for _, target in live], outcomes)
            if stop:
                return

    def _execute(self, ops: list[Operation]) -> list[Outcome]:
        started = time.monotonic()
        outcomes = self._transact(ops)
        METRICS.writer_batch.observe(len(ops))
        METRICS.writer_commit.observe(time.monotonic() - started)
        return outcomes

    def _transact(self, ops: list[Operation]) -> list[Outcome]:
        for attempt in range(_RETRIES):
            try:
                try:
                    with self._transaction() as conn, pipelined(conn):
                        return [(True, _run_optimistic(conn, op)) for op in ops]
                except (_Replay, Failed):  # something raised: run the batch again, isolated
                    with self._transaction() as conn:
                        return [_run_op(conn, op) for op in ops]
            except OPERATIONAL_ERRORS as exc:
                if attempt + 1 < _RETRIES and _retryable(exc):
                    time.sleep(random.uniform(0, 0.02 * (attempt + 1)))  # break the lockstep
                    continue
                if attempt == 0 and self.db.dialect == "postgresql":
                    # Most often the kept connection died with a server restart: once more,
                    # on a fresh (pre-pinged) connection. Operations are idempotent.
                    continue
                raise
        raise AssertionError("unreachable")

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One batch's write transaction, on a connection the writer keeps between batches
        (one thread writes): checking a connection out of the pool and back in, with its
        reset, cost more than a one-operation batch's statements, and on PostgreSQL the
        pool's ``pool_pre_ping`` a round trip per batch. A connection that died (a server
        restart) fails the batch with an operational error: it is dropped here and
        :meth:`_transact` runs the batch once more on a fresh one (checked out pre-pinged).
        One the pipeline had to invalidate (left in an unknown state) is dropped too."""
        if self._conn is None:
            self._conn = self.db.write_engine.connect()
        conn = self._conn
        try:
            with conn.begin():
                yield conn
        except OPERATIONAL_ERRORS:
            self._drop(conn)
            raise
        finally:
            if conn.invalidated and self._conn is conn:
                self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        self._conn = None
        with contextlib.suppress(Exception):  # a dead connection may fail even to close
            conn.close()


def _order(account_id: int | None) -> int:
    """Where an operation goes in its batch: by the account whose rows it locks.

    On PostgreSQL several processes' writers commit batches concurrently. Each operation locks
    rows of one customer account (its balance, key, day and rollup rows); if two batches took
    accounts A and B in opposite orders they would deadlock (a one-second wait, then a retry).
    Sorting every batch by account makes all writers lock in the same order. Operations whose
    account is not known up front (operator actions, the reaper) go last.
    """
    return _LAST if account_id is None else account_id


def _by_order(item: tuple[int, Operation, Target]) -> int:
    return item[0]


def _claim(target: Target) -> bool:
    """False if the caller gave up before the operation started (it will not run)."""
    if isinstance(target, Future):
        return target.set_running_or_notify_cancel()
    return not target[1].cancelled()


def _deliver(targets: list[Target], outcomes: list[Outcome]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = (
        defaultdict(list))
    for target, outcome in zip(targets, outcomes, strict=True):
        if isinstance(target, Future):
            if outcome[0]:
                target.set_result(outcome[1])
            else:
                target.set_exception(outcome[1])
        else:
            by_loop[target[0]].append((target[1], outcome))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop closed: its callers are gone
            pass


def _resolve(items: list[tuple[asyncio.Future[Any], Outcome]]) -> None:
    for future, (ok, value) in items:
        if future.done():  # cancelled meanwhile
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _Replay(Exception):
    """Raised inside the optimistic transaction to roll it back."""


def _run_optimistic(conn: Connection, op: Operation) -> Any:
    """Run an operation with no savepoint around it: the common case, where nothing raises.

    A savepoint is not free on SQLite: inside one, every page that earlier operations of the
    batch changed is copied to a statement journal. So a batch first runs bare; if any
    operation raises, the whole transaction is rolled back and the batch runs again with a
    savepoint per operation (operations are deterministic functions of the database state and
    idempotent, so running one twice is safe).
    """
    try:
        return op(conn)
    except OPERATIONAL_ERRORS:
        raise
    except Exception as exc:
        raise _Replay from exc


def _run_op(conn: Connection, op: Operation) -> Outcome:
    """Run one operation in its own savepoint; its exception goes back to its caller.

    Savepoints are issued on the DBAPI cursor: SQLAlchemy's ``begin_nested`` costs more than
    the ledger statements it would wrap. A unique-key violation is retried once: it means a
    concurrent transaction (another process) committed the same idempotency key first, and the
    second attempt finds that first result instead of failing.
    """
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    for attempt in range(2):
        cursor.execute("SAVEPOINT tollway_op")
        try:
            result = op(conn)
        except OPERATIONAL_ERRORS:
            raise  # lost connection or deadlock: the whole batch is retried
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            cursor.execute("ROLLBACK TO SAVEPOINT tollway_op")
            cursor.execute("RELEASE SAVEPOINT tollway_op")
            if attempt == 0 and isinstance(exc, INTEGRITY_ERRORS):
                continue
            return False, exc
        cursor.execute("RELEASE SAVEPOINT tollway_op")
        return True, result
    raise AssertionError("unreachable")


def _retryable(exc: Exception) -> bool:
    code = getattr(getattr(exc, "orig", exc), "sqlstate", None)
    return code in ("40001", "40P01")  # serialization failure, deadlock detected
