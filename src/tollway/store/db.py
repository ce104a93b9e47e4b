"""Engines for SQLite and PostgreSQL, and the transaction helpers every store module uses.

SQLite is opened in WAL mode with ``synchronous=NORMAL`` (the WAL is synced at checkpoints
only: a commit survives a crash of the process, not a power loss or OS crash; see README
"Durability"), or ``FULL`` when ``TOLLWAY_SQLITE_SYNCHRONOUS=full`` (a commit is on disk before
it is acknowledged). Python's sqlite3 module would open deferred transactions that fail at
once with SQLITE_BUSY when they later write, so transaction control is taken over: writes begin
with ``BEGIN IMMEDIATE`` (waiting up to ``busy_timeout`` for the lock), reads with a plain
``BEGIN``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from tollway import settings
from tollway.errors import InvalidRequest, StorageUnavailable
from tollway.store import pipeline

T = TypeVar("T")

#: ``TOLLWAY_SQLITE_SYNCHRONOUS`` → SQLite's ``PRAGMA synchronous``.
SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}

#: Errors as raised through SQLAlchemy or straight from the drivers (see ``prepared.py``).
INTEGRITY_ERRORS = (sa_exc.IntegrityError, sqlite3.IntegrityError, psycopg.IntegrityError)
#: The database could not do the work at all (server down, connection lost, disk or lock
#: trouble): nothing of the transaction happened, and the operation may be tried again.
OPERATIONAL_ERRORS = (sa_exc.OperationalError, sa_exc.InterfaceError, sqlite3.OperationalError,
                      psycopg.OperationalError, psycopg.InterfaceError)


def storage_error(exc: BaseException) -> StorageUnavailable | None:
    """The public 503 ``storage_unavailable`` for a database failure, else None.

    The one place that decides which driver errors mean "the database cannot be reached":
    the writer, ``Context.read`` and the HTTP error handler all ask here. The message never
    carries the driver's text (it may name hosts and users).
    """
    if isinstance(exc, StorageUnavailable):
        return exc
    if isinstance(exc, OPERATIONAL_ERRORS) or (
            isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated):
        return StorageUnavailable("the database is unavailable; retry later (with the same "
                                  "Idempotency-Key: a charge that reached the ledger just "
                                  "before the outage is then replayed, never repeated)")
    return None


class Database:
    """One database: a read engine and a write engine (the same engine on PostgreSQL)."""

    def __init__(self, url: str, *, busy_timeout_ms: int = 30_000, pool_size: int = 8,
                 null_pool: bool = False, synchronous: str | None = None) -> None:
        """``null_pool`` opens a fresh connection for every use (concurrency tests);
        ``synchronous`` (SQLite): ``full`` or ``normal``, by default the setting's."""
        self.url = normalize_url(url)
        parsed = sa.engine.make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            mode = synchronous or settings.get("sqlite_synchronous")
            if mode not in SYNCHRONOUS:
                raise InvalidRequest(f"TOLLWAY_SQLITE_SYNCHRONOUS must be one of "
                                     f"{', '.join(SYNCHRONOUS)}, got {mode!r}")
            self.engine = _sqlite_engine(self.url, "BEGIN", busy_timeout_ms, null_pool,
                                         SYNCHRONOUS[mode])
            self.write_engine = _sqlite_engine(self.url, "BEGIN IMMEDIATE", busy_timeout_ms,
                                               null_pool, SYNCHRONOUS[mode])
        elif self.dialect == "postgresql":
            # pool_pre_ping: a connection that died with a server restart is replaced at
            # checkout, so the service recovers by itself once the server is back.
            pool: dict[str, Any] = ({"poolclass": NullPool} if null_pool else
                                    {"pool_size": pool_size, "max_overflow": pool_size * 4,
                                     "pool_pre_ping": True})
            # The pipeline-aware cursor (store/pipeline.py) is what lets the writer pipeline
            # a batch; outside pipeline mode it is psycopg's own cursor.
            self.engine = sa.create_engine(self.url, connect_args={
                "connect_timeout": 5, "cursor_factory": pipeline.Cursor}, **pool)
            self.write_engine = self.engine
        else:
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite:/// or "
                             "postgresql://")

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: BEGIN IMMEDIATE on SQLite, committed on exit."""
        with self.write_engine.begin() as conn:
            yield conn

    def run_write(self, op: Callable[[Connection], T]) -> T:
        """Run ``op`` in its own write transaction. A unique-key violation is retried once: a
        concurrent transaction committed the same idempotency key first, and the retry finds
        its result (the writer does the same for the server)."""
        for attempt in range(2):
            try:
                with self.write() as conn:
                    return op(conn)
            except INTEGRITY_ERRORS:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()
        if self.write_engine is not self.engine:
            self.write_engine.dispose()


def normalize_url(url: str) -> str:
    """Accept ``postgres://`` and ``postgresql://`` and use the psycopg 3 driver."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _sqlite_engine(url: str, begin: str, busy_timeout_ms: int, null_pool: bool,
                   synchronous: str) -> Engine:
    memory = ":memory:" in url or url.rstrip("/") == "sqlite:"
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if null_pool:
        kwargs["poolclass"] = NullPool
    elif not memory:
        kwargs["poolclass"] = sa.pool.QueuePool
        kwargs["pool_size"] = 8
        kwargs["max_overflow"] = 64
    engine = sa.create_engine(url, **kwargs)

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.execute("PRAGMA temp_store = MEMORY")  # statement journals stay off disk
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # On the DBAPI cursor: ``exec_driver_sql``'s execution context cost more than the rest
        # of a one-operation writer batch. A failure reads as it did through SQLAlchemy.
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            execute_raw(conn, cursor, begin, ())
        except sqlite3.Error as exc:
            raise sa_exc.DBAPIError.instance(begin, (), exc, sqlite3.Error) from exc

    return engine


def execute_raw(conn: Connection, cursor: Any, sql: str, args: Any) -> None:
    """Run ``sql`` on a DBAPI cursor of ``conn``'s transaction, bypassing SQLAlchemy's
    execution layer; statement listeners (the statement-budget tests count statements that
    way) are still told. An engine with events is asked whether it has statement listeners:
    the SQLite engines always have events (``connect``, ``begin``), and calling two empty
    listener lists around every statement cost more than the question."""
    dispatch = conn.dispatch
    if conn.engine._has_events and (dispatch.before_cursor_execute
                                    or dispatch.after_cursor_execute):
        dispatch.before_cursor_execute(conn, cursor, sql, args, None, False)
        cursor.execute(sql, args)
        dispatch.after_cursor_execute(conn, cursor, sql, args, None, False)
    else:
        cursor.execute(sql, args)
