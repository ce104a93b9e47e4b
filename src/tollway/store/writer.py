"""The single writer: every money movement of a process goes through one thread that runs
queued operations in shared transactions (Datasette's pattern, TigerBeetle's batching).

Batching turns N commits (N fsyncs) into one without weakening anything: each operation runs
inside its own SAVEPOINT, so one that raises (say, insufficient balance) is rolled back alone
and the rest of the batch commits; no caller hears "done" before its batch is durable. On
PostgreSQL a batch that loses a deadlock or a serialization race is retried whole, which is
safe because every ledger operation is idempotent.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from tollway.store.db import INTEGRITY_ERRORS, OPERATIONAL_ERRORS, Database

T = TypeVar("T")
Operation = Callable[[Connection], Any]
_STOP = object()
_RETRIES = 5


class Writer:
    def __init__(self, db: Database, *, max_batch: int = 512) -> None:
        self.db = db
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tollway-writer", daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[Connection], T]) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((op, future))
        return future

    def call(self, op: Callable[[Connection], T]) -> T:
        """Run ``op`` in the next batch and wait for its durable result (sync callers)."""
        return self.submit(op).result()

    async def run(self, op: Callable[[Connection], T]) -> T:
        """Run ``op`` in the next batch without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(op))

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
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
            try:
                self._execute(batch)
            except BaseException as exc:  # noqa: BLE001 - never let the writer thread die
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            if stop:
                return

    def _execute(self, batch: list[tuple[Operation, Future[Any]]]) -> None:
        live = [(op, fut) for op, fut in batch if fut.set_running_or_notify_cancel()]
        for attempt in range(_RETRIES):
            outcomes: list[tuple[bool, Any]] = []
            try:
                with self.db.write() as conn:
                    outcomes = [_run_op(conn, op) for op, _ in live]
            except OPERATIONAL_ERRORS as exc:
                if attempt + 1 < _RETRIES and _retryable(exc):
                    continue
                for _, fut in live:
                    fut.set_exception(exc)
                return
            except BaseException as exc:  # noqa: BLE001 - commit failed: no effect happened
                for _, fut in live:
                    fut.set_exception(exc)
                return
            for (_, fut), (ok, value) in zip(live, outcomes, strict=True):
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            return


def _run_op(conn: Connection, op: Operation) -> tuple[bool, Any]:
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
