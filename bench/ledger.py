"""Ledger benchmark: hold + settle pairs per second through the real ledger and the real writer.

    python bench/ledger.py [--pairs N] [--rounds R] [--clients C] [--postgres URL] [--json]
                           [--driver threads|asyncio] [--breakdown] [--profile PREFIX]

For each backend (a SQLite file in a temporary directory; PostgreSQL when ``--postgres URL`` or
``TOLLWAY_BENCH_POSTGRES_URL`` is given, in fresh databases created on that server and dropped
after) it measures, interleaved A B A B for R rounds, each round in a fresh migrated database:

A. **ledger** - N requests, each a ``place_hold`` submitted on its own to ONE ``Writer`` and,
   once that future resolves, a ``settle_hold``; C concurrent clients keep requests in flight so
   the writer forms batches, as the gateway will.
B. **plain inserts** - the same rows a pair leaves behind (1 hold, 2 entries, 5 postings) into
   the same tables, written with ``executemany`` in transactions of exactly the sizes the writer
   formed in round A (same number of commits, same rows per commit), through the same
   ``Database`` (same pragmas: WAL, synchronous=FULL on SQLite). No reads, no updates, no
   savepoints, no Python per operation: the floor the database and its commits impose.

``--breakdown`` adds two rows that locate the time: the same ledger calls in the same commits
run in one thread without the Writer (no futures, queue or client threads), once with the
writer's per-operation SAVEPOINT and once without. ``--profile`` profiles the writer thread.

Each ledger database is checked after its round with ``tollway.ledger.verify.verify`` and a
count of settled holds, outside the timed part. Results: median pairs/s (min-max) and the
ratio ledger / plain inserts. The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import itertools
import json
import os
import platform
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import sqlalchemy as sa
from hostinfo import cpu_model, git_commit, loadavg

from tollway import clock
from tollway.ledger.ledger import place_hold, settle_hold, topup
from tollway.ledger.verify import verify
from tollway.store.accounts import create_account
from tollway.store.db import Database, normalize_url
from tollway.store.migrate import upgrade
from tollway.store.tables import holds
from tollway.store.writer import Writer, _run_op

HOLD_NANO = 2_000_000  # what each request reserves ($0.002)
CHARGE_NANO = 1_234_567  # what it is charged: less than the hold, so the rest is released
TTL_MS = 3_600_000
POSTINGS_PER_HOLD = 2  # available -> held
POSTINGS_PER_SETTLE = 3  # held out; released back to available; revenue in (no write-off)


# --------------------------------------------------------------------------- backends


class Backend:
    name: str

    def fresh(self, tag: str) -> str:
        """The URL of a fresh, migrated, empty database."""
        raise NotImplementedError

    def settings(self, db: Database) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tollway-bench-")

    def fresh(self, tag: str) -> str:
        url = f"sqlite:///{os.path.join(self.dir, tag + '.db')}"
        db = Database(url)
        upgrade(db)
        db.dispose()
        return url

    def settings(self, db: Database) -> dict[str, Any]:
        with db.write() as conn:  # a writer connection: the pragmas the writer runs with
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            journal = cur.execute("PRAGMA journal_mode").fetchone()[0]
            sync = cur.execute("PRAGMA synchronous").fetchone()[0]
        names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
        return {"sqlite_version": sqlite3.sqlite_version, "journal_mode": str(journal).upper(),
                "synchronous": names.get(int(sync), str(sync)), "dir": self.dir}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = sa.engine.make_url(normalize_url(url))
        self.admin = sa.create_engine(self.url, isolation_level="AUTOCOMMIT",
                                      poolclass=sa.pool.NullPool)
        self.prefix = f"tollway_bench_{os.getpid()}"
        self.created: list[str] = []
        self.template = self._create(f"{self.prefix}_tpl")
        db = Database(self._url(self.template))
        upgrade(db)
        db.dispose()

    def _url(self, name: str) -> str:
        return str(self.url.set(database=name).render_as_string(hide_password=False))

    def _create(self, name: str, template: str | None = None) -> str:
        with self.admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {name}"
                                 + (f" TEMPLATE {template}" if template else ""))
        self.created.append(name)
        return name

    def fresh(self, tag: str) -> str:
        return self._url(self._create(f"{self.prefix}_{tag}", self.template))

    def settings(self, db: Database) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with db.read() as conn:
            for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                         "wal_sync_method", "shared_buffers"):
                out[name] = conn.exec_driver_sql(f"SHOW {name}").scalar_one()
        out["host"] = f"{self.url.host}:{self.url.port}"
        return out

    def close(self) -> None:
        with self.admin.connect() as conn:
            for name in reversed(self.created):
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        self.admin.dispose()


# --------------------------------------------------------------------------- the writer


class RecordingWriter(Writer):
    """The real writer; records the make-up of every batch (to replay in the baseline) and can
    profile its own thread."""

    profile: cProfile.Profile | None = None

    def __init__(self, db: Database, profile: cProfile.Profile | None = None) -> None:
        self.batches: list[tuple[int, int]] = []  # (place_hold ops, settle_hold ops)
        self.profile = profile
        super().__init__(db)

    def _run(self) -> None:
        if self.profile is None:
            super()._run()
            return
        self.profile.enable()
        try:
            super()._run()
        finally:
            self.profile.disable()

    def _execute(self, ops: list[Any]) -> list[tuple[bool, Any]]:
        n_hold = sum(1 for op in ops if getattr(op, "func", None) is place_hold)
        self.batches.append((n_hold, len(ops) - n_hold))
        return super()._execute(ops)


@dataclass
class Run:
    pairs: int
    seconds: float
    cpu_seconds: float  # this process, user + system
    commits: int
    latencies: list[float] = field(default_factory=list)  # per pair, seconds
    errors: list[str] = field(default_factory=list)
    batches: list[tuple[int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    settled: int = 0

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds


def _setup_account(db: Database, pairs: int, tag: str) -> int:
    with db.write() as conn:
        account = create_account(conn, f"bench-{tag}", "default", at_ms=int(time.time() * 1000))
        topup(conn, account.id, HOLD_NANO * (pairs + 10) * 2, idempotency_key=f"fund-{tag}",
              at_ms=clock.now_ms())
    return account.id


def _ops(account_id: int, tag: str, i: int) -> tuple[Any, Callable[[int], Any]]:
    hold = partial(place_hold, account_id=account_id, amount_nano=HOLD_NANO,
                   idempotency_key=f"{tag}-{i}", ttl_ms=TTL_MS, at_ms=clock.now_ms())

    def settle(hold_id: int) -> Any:
        return partial(settle_hold, hold_id=hold_id, actual_nano=CHARGE_NANO,
                       idempotency_key=f"{tag}-{i}", at_ms=clock.now_ms())
    return hold, settle


def _drive_threads(writer: Writer, account_id: int, tag: str, pairs: int, clients: int
                   ) -> tuple[float, list[float], list[str]]:
    counter = itertools.count()
    start = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        mine: list[float] = []
        start.wait()
        while (i := next(counter)) < pairs:
            hold_op, settle_op = _ops(account_id, tag, i)
            t0 = time.perf_counter()
            try:
                hold = writer.submit(hold_op).result()
                writer.submit(settle_op(hold.id)).result()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            mine.append(time.perf_counter() - t0)
        latencies.extend(mine)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start.set()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies, errors


def _drive_asyncio(writer: Writer, account_id: int, tag: str, pairs: int, clients: int
                   ) -> tuple[float, list[float], list[str]]:
    latencies: list[float] = []
    errors: list[str] = []

    async def main() -> float:
        counter = itertools.count()

        async def client() -> None:
            while (i := next(counter)) < pairs:
                hold_op, settle_op = _ops(account_id, tag, i)
                t0 = time.perf_counter()
                try:
                    hold = await writer.run(hold_op)
                    await writer.run(settle_op(hold.id))
                except Exception as exc:  # noqa: BLE001
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - t0

    return asyncio.run(main()), latencies, errors


def run_ledger(url: str, pairs: int, clients: int, tag: str, driver: str,
               profile: cProfile.Profile | None = None, check: bool = True) -> Run:
    db = Database(url)
    account_id = _setup_account(db, pairs, tag)
    writer = RecordingWriter(db, profile)
    drive = _drive_threads if driver == "threads" else _drive_asyncio
    cpu0 = time.process_time()
    seconds, latencies, errors = drive(writer, account_id, tag, pairs, clients)
    cpu = time.process_time() - cpu0
    writer.close()
    run = Run(pairs, seconds, cpu, len(writer.batches), latencies, errors, writer.batches)
    if check:
        with db.read() as conn:
            run.problems = verify(conn)
            run.settled = int(conn.execute(sa.select(sa.func.count()).select_from(holds)
                                           .where(holds.c.status == "settled")).scalar_one())
    db.dispose()
    return run


def run_serial(url: str, batches: list[tuple[int, int]], pairs: int, tag: str,
               savepoints: bool) -> Run:
    """The breakdown: the same ledger calls in the writer's batch make-up, run in one thread
    with no Writer, futures or clients; with the writer's per-operation savepoint
    (``writer._run_op``) or calling each operation bare."""
    db = Database(url)
    account_id = _setup_account(db, pairs, tag)
    run_op = _run_op if savepoints else (lambda conn, op: (True, op(conn)))
    pending: list[int] = []
    i = 0
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for n_hold, n_settle in batches:
        ready, pending = pending[:n_settle], pending[n_settle:]  # placed in earlier batches
        with db.write() as conn:
            for _ in range(n_hold):
                hold_op, _settle = _ops(account_id, tag, i)
                ok, hold = run_op(conn, hold_op)
                assert ok, hold
                pending.append(hold.id)
                i += 1
            for hold_id in ready:
                ok, value = run_op(conn, partial(settle_hold, hold_id=hold_id,
                                                 actual_nano=CHARGE_NANO,
                                                 idempotency_key=f"{tag}-h{hold_id}",
                                                 at_ms=clock.now_ms()))
                assert ok, value
    seconds = time.perf_counter() - t0
    run = Run(pairs, seconds, time.process_time() - cpu0, len(batches))
    db.dispose()
    return run


# --------------------------------------------------------------------------- the baseline


def run_inserts(url: str, batches: list[tuple[int, int]], pairs: int, tag: str) -> Run:
    """The rows ``pairs`` hold+settle pairs leave behind, in the writer's commit sizes."""
    db = Database(url)
    account_id = _setup_account(db, pairs, tag)
    p = "?" if db.dialect == "sqlite" else "%s"
    sql_hold = (f"INSERT INTO holds (id, account_id, key_id, amount_nano, status, created_at_ms,"
                f" expires_at_ms, closed_at_ms, charged_nano, from_available_nano, shortfall_nano)"
                f" VALUES ({', '.join([p] * 11)})")
    sql_entry = (f"INSERT INTO entries (id, kind, account_id, amount_nano, hold_id,"
                 f" idempotency_key, balance_after_nano, note, created_at_ms)"
                 f" VALUES ({', '.join([p] * 9)})")
    sql_posting = (f"INSERT INTO postings (entry_id, account_id, bucket, amount_nano)"
                   f" VALUES ({', '.join([p] * 4)})")
    with db.read() as conn:
        next_entry = int(conn.exec_driver_sql("SELECT coalesce(max(id), 100) FROM entries")
                         .scalar_one()) + 1
        next_hold = int(conn.exec_driver_sql("SELECT coalesce(max(id), 100) FROM holds")
                        .scalar_one()) + 1
    released = HOLD_NANO - CHARGE_NANO
    # Build every row first: the timed part is the database's work, not Python's.
    plan = []
    pending: list[int] = []  # holds placed but not yet settled, in order
    entry_id, hold_id, i = next_entry, next_hold, 0
    for n_hold, n_settle in batches:
        hold_rows, entry_rows, posting_rows = [], [], []
        now = int(time.time() * 1000)
        for _ in range(n_hold):
            hold_rows.append((hold_id, account_id, None, HOLD_NANO, "settled", now, now + TTL_MS,
                              now, CHARGE_NANO, 0, 0))
            entry_rows.append((entry_id, "hold", account_id, HOLD_NANO, hold_id,
                               f"hold:{tag}-{i}", None, None, now))
            posting_rows += [(entry_id, account_id, "available", -HOLD_NANO),
                             (entry_id, account_id, "held", HOLD_NANO)]
            pending.append(hold_id)
            hold_id, entry_id, i = hold_id + 1, entry_id + 1, i + 1
        for _ in range(n_settle):
            hid = pending.pop(0) if pending else next_hold
            entry_rows.append((entry_id, "settle", account_id, CHARGE_NANO, hid,
                               f"settle:{tag}-{entry_id}", None, None, now))
            posting_rows += [(entry_id, account_id, "held", -HOLD_NANO),
                             (entry_id, account_id, "available", released),
                             (entry_id, 2, "available", CHARGE_NANO)]
            entry_id += 1
        plan.append((hold_rows, entry_rows, posting_rows))
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for hold_rows, entry_rows, posting_rows in plan:
        with db.write() as conn:
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            if hold_rows:
                cur.executemany(sql_hold, hold_rows)
            cur.executemany(sql_entry, entry_rows)
            cur.executemany(sql_posting, posting_rows)
    seconds = time.perf_counter() - t0
    run = Run(pairs, seconds, time.process_time() - cpu0, len(batches))
    db.dispose()
    return run


# --------------------------------------------------------------------------- driver


def _summary(runs: list[Run]) -> dict[str, Any]:
    rates = [r.rate for r in runs]
    out: dict[str, Any] = {
        "pairs_per_s": {"median": statistics.median(rates), "min": min(rates), "max": max(rates),
                        "rounds": rates},
        "commits": statistics.median(r.commits for r in runs),
        "pairs_per_commit": statistics.median(r.pairs / r.commits for r in runs),
        "cpu_us_per_pair": statistics.median(r.cpu_seconds / r.pairs * 1e6 for r in runs),
    }
    lat = sorted(x for r in runs for x in r.latencies)
    if lat:
        out["pair_latency_ms"] = {"p50": lat[len(lat) // 2] * 1e3,
                                  "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3}
    return out


def bench_backend(backend: Backend, args: argparse.Namespace, log: Callable[[str], None]
                  ) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": backend.name}
    warm = max(50, min(500, args.pairs // 10))
    log(f"[{backend.name}] warm-up ({warm} pairs each mode)")
    url = backend.fresh("warm_ledger")
    db = Database(url)
    result["settings"] = backend.settings(db)
    db.dispose()
    w = run_ledger(url, warm, args.clients, "warm", args.driver, check=False)
    run_inserts(backend.fresh("warm_inserts"), w.batches, warm, "warm")

    ledger_runs: list[Run] = []
    insert_runs: list[Run] = []
    extra: dict[str, list[tuple[Run, Run]]] = {}
    for r in range(args.rounds):
        tag = f"r{r}"
        a = run_ledger(backend.fresh(f"{tag}_ledger"), args.pairs, args.clients, tag,
                       args.driver)
        ledger_runs.append(a)
        b = run_inserts(backend.fresh(f"{tag}_inserts"), a.batches, args.pairs, tag)
        insert_runs.append(b)
        msg = (f"[{backend.name}] round {r + 1}/{args.rounds}: ledger {a.rate:,.0f} pairs/s "
               f"({a.commits} commits), plain inserts {b.rate:,.0f} pairs/s")
        if args.breakdown:
            for mode, savepoints in (("serial_savepoints", True), ("serial_bare", False)):
                x = run_serial(backend.fresh(f"{tag}_{mode}"), a.batches, args.pairs, tag,
                               savepoints)
                extra.setdefault(mode, []).append((x, b))
                msg += f", {mode} {x.rate:,.0f}"
        log(msg)

    checks = []
    for r, a in enumerate(ledger_runs):
        ok = not a.problems and not a.errors and a.settled == args.pairs
        checks.append({"round": r + 1, "ok": ok, "settled": a.settled,
                       "submitted": args.pairs, "errors": a.errors[:5],
                       "n_errors": len(a.errors), "verify_problems": a.problems[:10]})
    result["check"] = {"ok": all(c["ok"] for c in checks), "rounds": checks}
    ledger = _summary(ledger_runs)
    inserts = _summary(insert_runs)
    ratios = [a.rate / b.rate for a, b in zip(ledger_runs, insert_runs, strict=True)]
    ledger["ratio_vs_inserts"] = {"median": statistics.median(ratios), "rounds": ratios}
    result["modes"] = {"ledger": ledger, "plain_inserts": inserts}
    for mode, runs in extra.items():
        summary = _summary([x for x, _ in runs])
        summary["ratio_vs_inserts"] = {
            "median": statistics.median(x.rate / b.rate for x, b in runs),
            "rounds": [x.rate / b.rate for x, b in runs]}
        result["modes"][mode] = summary

    if args.profile:
        prof = cProfile.Profile()
        run_ledger(backend.fresh("profile"), args.pairs, args.clients, "prof", args.driver,
                   profile=prof, check=False)
        path = f"{args.profile}.{backend.name}.prof"
        prof.dump_stats(path)
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        total = stats.total_tt  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(args.profile_top)
        result["profile"] = {"file": path, "writer_thread_seconds": total,
                             "top_tottime": buf.getvalue()}
    return result


def machine() -> dict[str, Any]:
    model, commit = cpu_model(), git_commit()
    return {"nproc": os.cpu_count(), "commit": commit,
            "usable_cpus": len(os.sched_getaffinity(0)), "loadavg_start": loadavg(),
            "cpu_model": model, "python": platform.python_version(),
            "sqlalchemy": sa.__version__, "platform": platform.platform(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


_LABELS = (("ledger", "ledger (hold+settle)"), ("plain_inserts", "plain inserts"),
           ("serial_savepoints", "  serial, savepoints"), ("serial_bare", "  serial, bare ops"))


def render(results: dict[str, Any]) -> str:
    m, p = results["machine"], results["params"]
    lines = [
        f"Tollway ledger benchmark: hold + settle pairs through one Writer  ({m['date']})",
        (f"machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, "
         f"SQLAlchemy {m['sqlalchemy']}, commit {m['commit']}; client, writer and database "
         "server share the CPUs"),
        (f"pairs/round {p['pairs']}, {p['clients']} concurrent clients ({p['driver']}), "
         f"{p['rounds']} interleaved rounds (ledger, inserts, ledger, ...), medians"),
        (f"load average (1/5/15 min) at start {m['loadavg_start']}, at end "
         f"{m['loadavg_end']}: other work on the machine skews absolute figures"),
    ]
    for b in results["backends"]:
        s = b["settings"]
        if b["backend"] == "sqlite":
            lines.append(f"sqlite {s['sqlite_version']}: journal_mode={s['journal_mode']}, "
                         f"synchronous={s['synchronous']} (every commit fsynced before its "
                         "futures resolve)")
        else:
            durable = s["fsync"] == "on" and s["synchronous_commit"] == "on"
            note = "durable commits" if durable else "NOT durable: commits are not fsynced"
            lines.append(f"postgresql {s['server_version']}: fsync={s['fsync']}, "
                         f"synchronous_commit={s['synchronous_commit']}, "
                         f"full_page_writes={s['full_page_writes']} ({note})")
    header = (f"{'backend':<11} {'mode':<22} {'pairs/s median (min-max)':>28} "
              f"{'vs inserts':>10} {'pairs/commit':>12} {'CPU us/pair':>11} {'p50/p99 ms':>12}")
    lines += ["", header, "-" * len(header)]
    for b in results["backends"]:
        for mode, label in _LABELS:
            if mode not in b["modes"]:
                continue
            x = b["modes"][mode]
            r = x["pairs_per_s"]
            rng = f"{r['median']:,.0f} ({r['min']:,.0f}-{r['max']:,.0f})"
            ratio = f"{x['ratio_vs_inserts']['median']:.2f}" if "ratio_vs_inserts" in x else "1.00"
            lat = (f"{x['pair_latency_ms']['p50']:.1f}/{x['pair_latency_ms']['p99']:.1f}"
                   if "pair_latency_ms" in x else "-")
            lines.append(f"{b['backend']:<11} {label:<22} {rng:>28} {ratio:>10} "
                         f"{x['pairs_per_commit']:>12.1f} {x['cpu_us_per_pair']:>11.0f} {lat:>12}")
    if any("serial_bare" in b["modes"] for b in results["backends"]):
        lines.append("(serial rows: the same ledger calls and commits in one thread, no Writer, "
                     "futures or clients; 'bare' = without the per-operation SAVEPOINT)")
    lines.append("")
    for b in results["backends"]:
        c = b["check"]
        detail = ", ".join(f"round {x['round']}: settled {x['settled']}/{x['submitted']}"
                           + (f", {x['n_errors']} errors" if x["n_errors"] else "")
                           + (f", verify: {'; '.join(x['verify_problems'])}"
                              if x["verify_problems"] else ", verify clean")
                           for x in c["rounds"])
        lines.append(f"check {b['backend']}: {'OK' if c['ok'] else 'FAIL'} ({detail})")
    for b in results["backends"]:
        if "profile" in b:
            title = f"profile of the writer thread, {b['backend']} ({b['profile']['file']}):"
            lines += ["", title, b["profile"]["top_tottime"].rstrip()]
    return "\n".join(lines)


@contextmanager
def _backends(args: argparse.Namespace) -> Iterator[list[Backend]]:
    made: list[Backend] = []
    try:
        if not args.no_sqlite:
            made.append(SQLiteBackend())
        pg = args.postgres or os.environ.get("TOLLWAY_BENCH_POSTGRES_URL")
        if pg:
            made.append(PostgresBackend(pg))
        yield made
    finally:
        for b in made:
            b.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=5000, help="hold+settle pairs per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=64, help="concurrent requests in flight")
    ap.add_argument("--driver", choices=("threads", "asyncio"), default="asyncio",
                    help="clients as asyncio tasks (Writer.run, as the gateway calls it) "
                         "or threads")
    ap.add_argument("--postgres", metavar="URL",
                    help="PostgreSQL server to benchmark too (or TOLLWAY_BENCH_POSTGRES_URL)")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite backend")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="also profile the writer thread (cProfile) in one extra ledger run per "
                         "backend; writes PREFIX.<backend>.prof")
    ap.add_argument("--profile-top", type=int, default=20)
    ap.add_argument("--breakdown", action="store_true",
                    help="also run, each round, the same ledger calls in the writer's batch "
                         "make-up in one thread without the Writer: with its per-operation "
                         "savepoints, and bare")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    results: dict[str, Any] = {"machine": machine(), "params": {
        "pairs": args.pairs, "rounds": args.rounds, "clients": args.clients,
        "driver": args.driver, "hold_nano": HOLD_NANO, "charge_nano": CHARGE_NANO,
        "rows_per_pair": {"holds": 1, "entries": 2,
                          "postings": POSTINGS_PER_HOLD + POSTINGS_PER_SETTLE}}}
    with _backends(args) as backends:
        results["backends"] = [bench_backend(b, args, log) for b in backends]
    results["machine"]["loadavg_end"] = loadavg()
    results["ok"] = all(b["check"]["ok"] for b in results["backends"])
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
