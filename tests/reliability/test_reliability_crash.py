"""Crash safety: a gateway SIGKILLed at random moments under load, and a PostgreSQL server
restarted under load.

The load always has requests at every stage in flight (slow streams keep some mid-stream at
any moment; batches of holds and settlements are committing), so each kill lands mid-hold,
mid-stream, mid-settlement or mid-batch-commit. After the restarts:

- the holds the dead processes left are released by the reaper (hold TTL 4 s, reaper every
  second here), and at least one such release happened (the kills did hit requests in flight);
- every response a client saw complete has exactly one usage record and charge, at the cost
  the client was told; every error it saw is charged nothing; no balance is negative;
- SQLite's ``PRAGMA integrity_check`` is ``ok`` and ``tollway ledger verify`` passes.

On SQLite this runs in both durability modes (``TOLLWAY_SQLITE_SYNCHRONOUS``): ``full`` and
``normal``, whose promise is exactly this one (a killed process loses no acknowledged commit;
only a power loss or OS crash may).

While PostgreSQL is down the gateway answers 503 ``storage_unavailable`` (never 500), and it
recovers by itself once the server is back.
"""

from __future__ import annotations

import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from cluster import (
    TOLLWAY,
    BackgroundLoad,
    PgCluster,
    Plan,
    Server,
    catalog_text,
    check_books,
    customers,
    prepare,
    report,
    server_env,
    servers,
    wait_no_open_holds,
)
from fakes import FakeUpstream, LLMScript
from tollway.store.db import Database
from tollway.store.tables import holds

STRESS = bool(os.environ.get("TOLLWAY_STRESS"))
KILLS = 10 if STRESS else 2
#: One worker per server in the fast version: a start costs seconds on a busy machine.
WORKERS = 2 if STRESS else 1
HOLD_TTL_S = 4
REAPER_S = 1
#: Slow streams: ten chunks 0.05 s apart, well inside the hold TTL even on a loaded machine.
SLOW = LLMScript(content=[f" word{i}" for i in range(10)], chunk_delay=0.05)
WEIGHTS = {"chat": 3, "stream": 3, "slow-stream": 4, "lookup": 3, "sandbox-chat": 1,
           "messages-stream": 1,
           "sandbox-search": 1, "broken-model": 1, "broken-api": 1, "poor": 1}

pytestmark = pytest.mark.skipif(not TOLLWAY.exists(), reason="tollway is not installed")


@pytest.fixture(scope="module")
def fakes() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream() as fast, FakeUpstream() as slow:
        slow.llm = SLOW
        yield fast, slow


def settings() -> dict[str, str]:
    return {"hold_ttl_seconds": str(HOLD_TTL_S), "reaper_interval_seconds": str(REAPER_S)}


def expired_holds(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(holds)
                                .where(holds.c.status == "expired")).scalar_one())


def answered(load: BackgroundLoad) -> int:
    return sum(o.status != 0 for o in list(load.outcomes))


def wait_for_requests(load: BackgroundLoad, more: int, timeout_s: float = 120) -> None:
    """Until the load got ``more`` further answers (any status; refused connections while a
    server restarts do not count)."""
    target = answered(load) + more
    deadline = time.monotonic() + timeout_s
    while answered(load) < target and time.monotonic() < deadline:
        time.sleep(0.05)


def test_sigkill_under_load(db_url: str, tmp_path: Path,
                            fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    sigkill_under_load(db_url, tmp_path, fakes, "full")


def test_sigkill_under_load_sqlite_synchronous_normal(
        tmp_path: Path, fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    sigkill_under_load(f"sqlite:///{tmp_path / 'tollway.db'}", tmp_path, fakes, "normal")


def sigkill_under_load(db_url: str, tmp_path: Path, fakes: tuple[FakeUpstream, FakeUpstream],
                       synchronous: str) -> None:
    fast, slow = fakes
    env = server_env(db_url, tmp_path / "data", **settings(), sqlite_synchronous=synchronous)
    prepare(env, tmp_path, catalog_text(fast, slow))
    db = Database(db_url)
    rng = random.Random(11)
    try:
        made = customers(db, 4, usd=50)
        keys, poor_key = [k for _, k in made[:-1]], made[-1][1]
        with servers() as running:
            server = Server(env, tmp_path / "serve.log", workers=WORKERS).start()
            running.append(server)
            load = BackgroundLoad(lambda: [server.url], keys, poor_key,
                                  Plan(10**9, 16, weights=WEIGHTS))
            try:
                for _ in range(KILLS):
                    wait_for_requests(load, rng.randint(20, 120))
                    server.kill()  # SIGKILL, supervisor and workers: no shutdown code runs
                    server.start()  # same port, same database
                wait_for_requests(load, 100)
            finally:
                outcomes = load.finish()
            # The dead processes' holds: released by the restarted server's reaper.
            assert wait_no_open_holds(db, timeout_s=HOLD_TTL_S + 120) == 0
            assert expired_holds(db) >= 1  # the kills did catch requests in flight
            server.stop()
        if db.dialect == "sqlite":
            with db.read() as conn:
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        figures = check_books(db, env, outcomes, exact=False)
        assert figures["complete"] > 0
        report(f"SIGKILL x{KILLS} under load ({db.dialect}, synchronous={synchronous})",
               {**figures, "expired_holds": expired_holds(db)})
    finally:
        db.dispose()


def health(url: str) -> tuple[int, str]:
    """(status, body) of /healthz; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, ""


def test_postgresql_restart_under_load(tmp_path: Path,
                                       fakes: tuple[FakeUpstream, FakeUpstream]) -> None:
    if not os.environ.get("TOLLWAY_TEST_POSTGRES_URL"):
        if os.environ.get("CI"):
            pytest.fail("CI needs PostgreSQL")
        pytest.skip("PostgreSQL not configured")
    fast, slow = fakes
    pg = PgCluster(tmp_path / "pg")
    try:
        url = pg.start()
        env = server_env(url, tmp_path / "data", **settings())
        prepare(env, tmp_path, catalog_text(fast, slow))
        db = Database(url)
        made = customers(db, 4, usd=50)
        keys, poor_key = [k for _, k in made[:-1]], made[-1][1]
        with servers() as running:
            server = Server(env, tmp_path / "serve.log", workers=WORKERS).start()
            running.append(server)
            load = BackgroundLoad(lambda: [server.url], keys, poor_key,
                                  Plan(10**9, 16, weights=WEIGHTS))
            try:
                wait_for_requests(load, 100)
                db.dispose()
                pg.stop()
                before = load.seen()
                down = health(server.url)
                wait_for_requests(load, 50)
                during = load.outcomes[before:]
                pg.start()
                deadline = time.monotonic() + 120
                while health(server.url)[0] != 200 and time.monotonic() < deadline:
                    time.sleep(0.2)
                recovered = load.seen()
                wait_for_requests(load, 200)
            finally:
                outcomes = load.finish()
            after = outcomes[recovered:]
            assert wait_no_open_holds(db, timeout_s=HOLD_TTL_S + 120) == 0
            server.stop()
        assert down[0] == 503 and '"storage_unavailable"' in down[1], down
        codes = {(o.status, o.code) for o in during}
        assert (503, "storage_unavailable") in codes, codes
        # never an internal error (broken-api's 500 is its upstream's answer, passed through)
        internal = [o for o in outcomes if o.status == 500 and o.kind != "broken-api"]
        assert internal == [], internal[:5]
        # Recovered by itself: after the restart everything works as before.
        assert sum(o.complete for o in after) > 0
        # a broken upstream opens its channel's circuit: 503 no_channel_available, uncharged
        unexpected = [o for o in after if o.status not in (200, 402, 500, 502)
                      and not (o.kind.startswith("broken") and o.code == "no_channel_available")]
        assert unexpected == [], unexpected[:5]
        figures = check_books(db, env, outcomes, exact=False)
        report("PostgreSQL restart under load", {
            **figures, "storage_unavailable": sum(o.code == "storage_unavailable"
                                                  for o in outcomes)})
        db.dispose()
    finally:
        pg.remove()
