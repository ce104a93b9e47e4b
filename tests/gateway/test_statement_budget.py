"""The database work of one request, counted, against a budget pinned in :data:`BUDGET`.

Timing stays in ``bench/``; this guards the hot path without it. For each request type the
gateway's own engines are watched (SQLAlchemy's ``before_cursor_execute``, ``commit`` and
``rollback`` events) while one request runs on a warm server (key cached, catalog loaded,
background loops idle): the SQL statements sent, the transactions committed and rolled back,
and the rows written (inserted, updated or deleted: on PostgreSQL by a row trigger on every
table, see :data:`_COUNT_ROWS`; on SQLite the change of ``sqlite3.Connection.total_changes``).
Savepoints the writer issues on the raw DBAPI cursor (only when an operation of a batch
raised) are not SQLAlchemy statements and are not counted.

On PostgreSQL the network round trips are counted too: what costs a PostgreSQL deployment its
latency, since the writer's one thread waits for each. libpq's own protocol trace
(``PQtrace``) of every connection the gateway uses records each message the client sends and
receives; a round trip is a run of messages sent followed by the server's answer (one per
statement outside pipeline mode; in the writer's pipelined batches, one per result read before
the next statement can be built and one for the batch's end and its COMMIT). A pooled
connection (a read) is traced from its checkout to its check-in, plus the empty-query ping
SQLAlchemy sends before each checkout (``pool_pre_ping``), which happens before the trace can
start and is added as one; the writer's own connection, which it keeps, from its first
transaction while counting until it is idle again.

A change that adds database work must change this table on purpose; one that removes work
lowers it. The numbers are exact, per backend.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from psycopg import pq
from sqlalchemy import event

from fakes import (
    GATEWAY_ENV,
    IGNORE_TOKENIZER_WARNING,
    DataReply,
    FakeClock,
    FakeUpstream,
    LLMScript,
    Tollway,
    fake_catalog,
    fresh_database,
    running_tollway,
)
from tollway.clock import now_ms
from tollway.store import auto_recharge as recharge_store
from tollway.store.accounts import KeyLimits
from tollway.store.tables import notification_events

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

HELLO = [{"role": "user", "content": "hello there"}]


@dataclass(frozen=True)
class Work:
    statements: int
    commits: int
    rollbacks: int
    rows: int
    #: PostgreSQL only (the server is in process on SQLite), and an upper bound: in pipeline
    #: mode, whether the server's answer to one part of a batch arrives before the client sends
    #: the next part is timing, so a run may count one turn fewer per batch than the budget
    round_trips: int | None = None


#: (request type, backend) → the database work of one request. Lower these as work is cut.
#: SQLite counts its ``BEGIN IMMEDIATE`` as a statement; PostgreSQL's BEGIN and COMMIT are
#: sent on the raw connection, inside the writer's pipeline (``store/pipeline.py``).
#: Two commits: the hold's batch and the settlement's (or the refusal record's) batch.
#: A refused hold raises inside the writer's batch, which is rolled back and run again.
#: A billed request writes 12 rows: the hold's batch 3 (the wallet's and the key's guarded
#: UPDATEs, the hold), the settlement's 9 (the hold closed, wallet, key, the wallet's day, ONE
#: ledger entry with the charge's 2 postings, the usage record and its rollup). The hold books
#: nothing in the ledger and its request id is not looked up (it is fresh). A refusal runs its
#: hold twice (the batch is replayed); the second run looks the request id up (it may have
#: been committed by a run before).
#: PostgreSQL writes the same rows in fewer statements (data-modifying CTEs, ``pgfast``): the
#: hold is ONE statement (wallet, key, hold: ``ledger._reserve_all``; a key with spend caps
#: adds its caps' upsert and the hold's INSERT), a settlement the hold covers ONE
#: (``ledger._SETTLE_COVERED``: hold, wallet, day, key, entry, postings) and the usage record
#: with its rollup ONE (``store.usage``): 11 → 3 statements a billed request. Its rows are
#: counted by row triggers (a CTE's cursor reports only its last part's rows).
#: PostgreSQL round trips (``store/pipeline.py``, an upper bound: see ``Work``): 20 before the
#: writer pipelined its batches, 10 after; now 4: per batch one wait for the one result read
#: (the hold's id; the settlement's closed hold) and one sync that carries the unread writes
#: and the COMMIT. The writer keeps its connection between batches: no pool pre-ping (one
#: round trip a batch before). Refusals replay the batch unpipelined.
BUDGET: dict[tuple[str, str], Work] = {
    ("chat", "sqlite"): Work(statements=13, commits=2, rollbacks=0, rows=12),
    ("chat", "postgresql"): Work(statements=3, commits=2, rollbacks=0, rows=12, round_trips=4),
    ("stream", "sqlite"): Work(statements=13, commits=2, rollbacks=0, rows=12),
    ("stream", "postgresql"): Work(statements=3, commits=2, rollbacks=0, rows=12, round_trips=4),
    ("per-call", "sqlite"): Work(statements=13, commits=2, rollbacks=0, rows=12),
    ("per-call", "postgresql"): Work(statements=3, commits=2, rollbacks=0, rows=12,
                                     round_trips=4),
    ("refused-402", "sqlite"): Work(statements=13, commits=1, rollbacks=1, rows=0),
    ("refused-402", "postgresql"): Work(statements=11, commits=1, rollbacks=1, rows=0,
                                        round_trips=19),
    ("refused-429", "sqlite"): Work(statements=12, commits=2, rollbacks=1, rows=4),
    ("refused-429", "postgresql"): Work(statements=6, commits=2, rollbacks=1, rows=4,
                                        round_trips=13),
    # auto-recharge (issue 17): a watched wallet that stays above its threshold costs
    # nothing more (the threshold comes back in the RETURNING of the hold's UPDATE); the one
    # request that crosses it pays 3 statements and 3 rows more (disarm, the outbox event,
    # its delivery)
    ("per-call-recharge-watched", "sqlite"): Work(statements=13, commits=2, rollbacks=0,
                                                  rows=12),
    ("per-call-recharge-watched", "postgresql"): Work(statements=3, commits=2, rollbacks=0,
                                                      rows=12, round_trips=4),
    ("per-call-recharge-crossing", "sqlite"): Work(statements=16, commits=2, rollbacks=0,
                                                   rows=15),
    ("per-call-recharge-crossing", "postgresql"): Work(statements=6, commits=2, rollbacks=0,
                                                       rows=15, round_trips=7),
    # Responses (0014): the settlement also remembers the response id with its account and
    # tokens (one upsert, one row); a request continuing one (previous_response_id) reads it
    # first (one SELECT in a read transaction of its own, before the hold). Chat, streams and
    # per-call requests above do none of this.
    ("responses", "sqlite"): Work(statements=14, commits=2, rollbacks=0, rows=13),
    ("responses", "postgresql"): Work(statements=4, commits=2, rollbacks=0, rows=13,
                                      round_trips=4),
    ("responses-continued", "sqlite"): Work(statements=16, commits=3, rollbacks=0, rows=13),
    ("responses-continued", "postgresql"): Work(statements=5, commits=3, rollbacks=0,
                                                rows=13, round_trips=8),
}

#: A warm, quiet server: keys cached for the test's length, no background loop in the window.
QUIET_ENV = {**GATEWAY_ENV, "TOLLWAY_KEY_CACHE_SECONDS": "3600",
             "TOLLWAY_CATALOG_REFRESH_SECONDS": "3600", "TOLLWAY_REAPER_INTERVAL_SECONDS": "3600",
             "TOLLWAY_NOTIFY_INTERVAL_SECONDS": "0"}


class Counter:
    """The work done on every engine but the test's own while :meth:`counting`."""

    def __init__(self, own: set[sa.Engine]) -> None:
        self.own = own
        self.own_pools = {engine.pool for engine in own}
        self.lock = threading.Lock()
        self.on = False
        self.statements = self.commits = self.rollbacks = self.rows = self.round_trips = 0
        self.sql: list[str] = []
        self._changes: dict[int, int] = {}
        self._traces: dict[int, Any] = {}

    def _watched(self, conn: Any) -> bool:
        return self.on and conn.engine not in self.own

    def before_execute(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if self._watched(conn):
            with self.lock:
                self.statements += 1
                self.sql.append(" ".join(statement.split())[:70])


    def _sqlite_rows(self, conn: Any) -> None:
        if conn.dialect.name != "sqlite":
            return
        raw = conn.connection.dbapi_connection
        total = raw.total_changes
        with self.lock:
            before = self._changes.get(id(raw))
            self._changes[id(raw)] = total
            if self._watched(conn) and before is not None:
                self.rows += total - before

    def begin(self, conn: Any) -> None:
        raw = conn.connection.dbapi_connection
        if conn.dialect.name == "sqlite":
            with self.lock:
                self._changes[id(raw)] = raw.total_changes
        elif self._watched(conn) and id(raw) not in self._traces:
            self._trace(raw, kept=True)  # the writer's kept connection: never checked out

    def commit(self, conn: Any) -> None:
        self._sqlite_rows(conn)
        if self._watched(conn):
            with self.lock:
                self.commits += 1

    def rollback(self, conn: Any) -> None:
        self._sqlite_rows(conn)
        if self._watched(conn):
            with self.lock:
                self.rollbacks += 1

    def checkout(self, dbapi_conn: Any, record: Any, proxy: Any) -> None:
        """A gateway's PostgreSQL connection leaves its pool: trace it until it is back."""
        pool = getattr(proxy, "_pool", None)
        if not self.on or pool in self.own_pools or not hasattr(dbapi_conn, "pgconn"):
            return
        self._trace(dbapi_conn, kept=False)
        with self.lock:
            self.round_trips += int(bool(getattr(pool, "_pre_ping", False)))

    def _trace(self, dbapi_conn: Any, *, kept: bool) -> None:
        trace = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed at checkin or settle
        dbapi_conn.pgconn.trace(trace.fileno())
        dbapi_conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        with self.lock:
            self._traces[id(dbapi_conn)] = (dbapi_conn, trace, kept)

    def checkin(self, dbapi_conn: Any, record: Any) -> None:
        with self.lock:
            found = self._traces.pop(id(dbapi_conn), None)
        if found is not None:
            self._count(dbapi_conn, found[1])

    def _count(self, dbapi_conn: Any, trace: Any) -> None:
        dbapi_conn.pgconn.untrace()  # flushes libpq's buffered trace
        trace.seek(0)
        turns = _round_trips(trace.read())
        trace.close()
        with self.lock:
            self.round_trips += turns

    def settle(self) -> None:
        """Wait until every connection checked out while counting is back in its pool (the
        gateway returns a read's connection just after it), then count the writer's kept
        connection once it is idle (its batch committed when the test saw its records; the
        writer may still be reading the server's answer)."""
        deadline = time.monotonic() + 5
        while (any(not kept or conn.pgconn.transaction_status != pq.TransactionStatus.IDLE
                   for conn, _, kept in self._traces.values())
               and time.monotonic() < deadline):
            time.sleep(0.01)
        with self.lock:
            left, self._traces = self._traces, {}
        assert all(kept for _, _, kept in left.values()), (
            "a traced connection was not returned to its pool")
        for dbapi_conn, trace, _ in left.values():
            self._count(dbapi_conn, trace)

    def reset(self) -> None:
        self.statements = self.commits = self.rollbacks = self.rows = self.round_trips = 0
        self.sql = []

    def work(self, backend: str, pg_rows: int = 0) -> Work:
        return Work(self.statements, self.commits, self.rollbacks, self.rows + pg_rows,
                    self.round_trips if backend == "postgresql" else None)


def _round_trips(trace: str) -> int:
    """Round trips in a libpq trace: runs of client messages ("F") answered by the server
    ("B")."""
    turns, sending = 0, False
    for line in trace.splitlines():
        direction = line.split("\t", 1)[0]
        if direction == "F":
            sending = True
        elif direction == "B" and sending:
            turns += 1
            sending = False
    return turns


@pytest.fixture(params=["sqlite", "postgresql"])
def counted(request: pytest.FixtureRequest, upstream: FakeUpstream
            ) -> Iterator[tuple[Tollway, Counter, str]]:
    backend = request.param
    clock = FakeClock(now_ms())  # one rate-limit minute for the whole test
    with fresh_database(request) as db:
        if backend == "postgresql":
            with db.write() as conn:  # no parameters: psycopg sends the text as is
                conn.connection.dbapi_connection.cursor().execute(_COUNT_ROWS)
        with running_tollway(db, fake_catalog(upstream), upstream, env=QUIET_ENV,
                             clock=clock) as tw:
            yield from _counting(tw, db, backend)


def _counting(tw: Tollway, db: Any, backend: str) -> Iterator[tuple[Tollway, Counter, str]]:
    counter = Counter({db.engine, db.write_engine})
    hooks = [("before_cursor_execute", counter.before_execute),
             ("begin", counter.begin), ("commit", counter.commit),
             ("rollback", counter.rollback)]
    pool_hooks = [("checkout", counter.checkout), ("checkin", counter.checkin)]
    for name, fn in hooks:
        event.listen(sa.engine.Engine, name, fn)
    for name, fn in pool_hooks:
        event.listen(sa.pool.Pool, name, fn)
    try:
        tw.begin_test()
        yield tw, counter, backend
    finally:
        for name, fn in hooks:
            event.remove(sa.engine.Engine, name, fn)
        for name, fn in pool_hooks:
            event.remove(sa.pool.Pool, name, fn)


def _chat(http: httpx.Client, key: str, **body: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                     json={"model": "gpt-test", "messages": HELLO, "max_tokens": 10, **body})


def _respond(http: httpx.Client, key: str, **body: Any) -> httpx.Response:
    return http.post("/v1/responses", headers={"Authorization": f"Bearer {key}"},
                     json={"model": "gpt-test", "input": "hello there",
                           "max_output_tokens": 10, **body})


#: PostgreSQL: every row a statement inserts, updates or deletes, counted by a row trigger on
#: every table, on a sequence (not transactional: rows of a rolled-back attempt count, as on
#: SQLite). One statement may write several tables (data-modifying CTEs), which its cursor's
#: ``rowcount`` would not tell.
_COUNT_ROWS = """
CREATE SEQUENCE test_rows_written;
CREATE FUNCTION test_count_row() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM nextval('test_rows_written'); RETURN NULL; END $$;
DO $$ DECLARE t text; BEGIN
    FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = 'public' LOOP
        EXECUTE format('CREATE TRIGGER test_count_row AFTER INSERT OR UPDATE OR DELETE ON %I '
                       'FOR EACH ROW EXECUTE FUNCTION test_count_row()', t);
    END LOOP;
END $$;
"""


def _rows_written(tw: Tollway) -> int:
    with tw.db.engine.connect() as conn:
        last, called = conn.exec_driver_sql(
            "SELECT last_value, is_called FROM test_rows_written").one()
    return int(last) if called else 0


def _measure(tw: Tollway, counter: Counter, request: Any, records: int, backend: str) -> Work:
    """The work of ``request()`` until the gateway wrote its ``records``-th usage record."""
    rows_before = _rows_written(tw) if backend == "postgresql" else 0
    counter.reset()
    counter.on = True
    try:
        request()
        tw.wait_records(records)
    finally:
        counter.on = False
    counter.settle()
    if backend == "postgresql":
        return counter.work(backend, _rows_written(tw) - rows_before)
    return counter.work(backend)


def test_database_work_per_request_type(counted: tuple[Tollway, Counter, str]) -> None:
    tw, counter, backend = counted
    tw.fake.llm = LLMScript(prompt_tokens=20, completion_tokens=5)
    tw.fake.data_replies["/data/users/jack"] = DataReply(200, b"jack", "text/plain")
    http = tw.http()
    rich = tw.account()
    key = tw.key(rich)
    limited = tw.key(rich, name="limited", limits=KeyLimits(rpm=1))
    poor_key = tw.key(tw.account(usd=None))
    # auto-recharge with a saved card: one wallet far above its threshold, one that the
    # measured call (0.002 USD after a warm-up call) takes from 9.998 to 9.996, below 9.997
    watched, crossing = tw.account(), tw.account()
    with tw.db.write() as conn:
        for account_id, threshold in ((watched, 1 * 10**9), (crossing, 9_997_000_000)):
            recharge_store.save(conn, account_id, {
                "enabled": True, "threshold_nano": threshold, "target_nano": 20 * 10**9,
                "monthly_cap_nano": 100 * 10**9, "stripe_customer": f"cus_{account_id}",
                "payment_method": f"pm_{account_id}"}, at_ms=now_ms())
    watched_key, crossing_key = tw.key(watched), tw.key(crossing)
    # Warm up: every key cached, every prepared statement compiled, on every path.
    for secret in (key, limited, poor_key):
        _chat(http, secret)
    _chat(http, key, stream=True)
    for secret in (key, watched_key, crossing_key):
        http.get("/apis/v1/twitter/user/jack", headers={"Authorization": f"Bearer {secret}"})
    _respond(http, key, previous_response_id="resp_warm")
    seen = len(tw.wait_records(7))
    assert seen == 7  # the 402 writes no record

    def stream() -> None:
        with http.stream("POST", "/v1/chat/completions",
                         headers={"Authorization": f"Bearer {key}"},
                         json={"model": "gpt-test", "messages": HELLO, "max_tokens": 10,
                               "stream": True}) as response:
            assert response.status_code == 200
            response.read()

    def status(code: int, send: Any) -> Any:
        def run() -> None:
            assert send().status_code == code
        return run

    cases = [  # (type, the request, the usage records it writes)
        ("chat", status(200, lambda: _chat(http, key)), 1),
        ("stream", stream, 1),
        ("per-call", status(200, lambda: http.get(
            "/apis/v1/twitter/user/jack", headers={"Authorization": f"Bearer {key}"})), 1),
        ("refused-402", status(402, lambda: _chat(http, poor_key)), 0),
        ("refused-429", status(429, lambda: _chat(http, limited)), 1),
        ("per-call-recharge-watched", status(200, lambda: http.get(
            "/apis/v1/twitter/user/jack", headers={"Authorization": f"Bearer {watched_key}"})),
         1),
        ("per-call-recharge-crossing", status(200, lambda: http.get(
            "/apis/v1/twitter/user/jack", headers={"Authorization": f"Bearer {crossing_key}"})),
         1),
        ("responses", status(200, lambda: _respond(http, key)), 1),
        ("responses-continued", status(200, lambda: _respond(
            http, key, previous_response_id="resp_fake")), 1),
    ]
    measured = {}
    for name, run, records in cases:
        seen += records
        measured[name] = _measure(tw, counter, run, seen, backend)
        assert len(tw.records()) == seen
    budget = {name: BUDGET[(name, backend)] for name, _, _ in cases}
    assert ({name: replace(work, round_trips=None) for name, work in measured.items()}
            == {name: replace(work, round_trips=None) for name, work in budget.items()})
    over = {name: (work.round_trips, budget[name].round_trips) for name, work in measured.items()
            if (work.round_trips or 0) > (budget[name].round_trips or 0)}
    assert not over, f"PostgreSQL round trips (measured, budget) over the budget: {over}"
    assert tw.open_holds() == 0 and tw.verify() == []
    with tw.db.read() as conn:  # the crossing queued its one charge; the other none
        due = conn.execute(sa.select(notification_events.c.account_id).where(
            notification_events.c.type == "auto_recharge.due")).scalars().all()
    assert due == [crossing]
