"""PostgreSQL pipeline mode for the writer's batches: a statement whose result nobody reads
is sent without waiting for it.

Each statement outside pipeline mode is a network round trip (send, wait, read), and the
writer's one thread runs a batch's statements one after the other: on PostgreSQL a batch
costs its statement count in round trips. In psycopg's pipeline mode ``execute`` only queues
the statement; the client waits only when a result is asked for (``fetchone``: a flush
request, then the results up to it) and at the end of the batch (one sync). The ledger's
inserts and updates whose results are not read (postings, the wallet's day, the key's
settlement, the usage record) ride along with the next statement that is read.

What changes for code running inside: nothing, with :class:`Cursor`. psycopg's own cursor
answers ``description`` and ``rowcount`` from the result it has, which in pipeline mode is
none yet, so SQLAlchemy would take a ``SELECT`` for a statement without rows. This cursor
waits for its result first when either is asked for (one round trip, as without the
pipeline). An error of a statement nobody read surfaces at the next read or at the sync:
possibly in another operation of the batch. The writer therefore treats any error inside a
pipelined batch as "some operation failed" and re-runs the batch the slow way, one
savepoint per operation, without the pipeline, where each error reaches its own caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import pq
from psycopg.errors import PipelineAborted
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

_IDLE = pq.TransactionStatus.IDLE


class Cursor(psycopg.Cursor[Any]):
    """A psycopg cursor that, in pipeline mode, waits for its own result when its
    ``description`` or ``rowcount`` is read (outside pipeline mode: psycopg's cursor)."""

    @property
    def description(self) -> list[psycopg.Column] | None:
        self._fetch_pipeline()
        return super().description

    @property
    def rowcount(self) -> int:
        self._fetch_pipeline()
        return super().rowcount


class Failed(Exception):
    """A statement of the pipelined batch failed (the cause is chained): run it again
    without the pipeline."""


@contextmanager
def pipelined(conn: Connection) -> Iterator[None]:
    """Run the block as one pipelined transaction on PostgreSQL (SQLite: as is).

    psycopg opens a transaction with a ``BEGIN`` it waits for, even in pipeline mode, and
    SQLAlchemy commits after the block with a ``COMMIT`` it waits for: two round trips a
    batch. So the connection is in autocommit mode for the block and the transaction is
    written out: ``BEGIN`` queued ahead of the first statement and ``COMMIT`` behind the last,
    answered by the one sync that ends the pipeline (SQLAlchemy's commit then finds no
    transaction open and sends nothing). A block that raises is rolled back here.

    A statement error, wherever it surfaces, raises :class:`Failed`; a lost connection or a
    deadlock (``OperationalError``) propagates as itself: the writer retries the whole batch
    for those.
    """
    if conn.dialect.name != "postgresql":
        yield
        return
    raw: Any = conn.connection.dbapi_connection
    raw.autocommit = True
    try:
        with raw.pipeline():
            raw.cursor().execute("BEGIN")
            yield
            raw.cursor().execute("COMMIT")
    except Exception as exc:
        with contextlib.suppress(psycopg.Error):  # a broken connection is discarded below
            if not raw.closed and raw.pgconn.transaction_status != _IDLE:
                raw.rollback()
        if _statement_failed(exc):
            raise Failed from exc
        raise
    finally:
        if not raw.closed and raw.pgconn.transaction_status == _IDLE:
            raw.autocommit = False
        else:  # never back to the pool in autocommit mode or inside a transaction
            conn.invalidate()


def _statement_failed(exc: Exception) -> bool:
    """A statement's own error (as psycopg or SQLAlchemy raised it), or the pipeline aborted
    by one; not a lost connection or a deadlock, and not an operation's own exception."""
    cause = getattr(exc, "orig", None) if isinstance(exc, DBAPIError) else exc
    return isinstance(cause, PipelineAborted) or (
        isinstance(cause, psycopg.Error) and not isinstance(cause, psycopg.OperationalError))
