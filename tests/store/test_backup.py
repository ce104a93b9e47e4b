"""Backups and the restore drill (issue 15), on SQLite and PostgreSQL.

A served Tollway takes requests from several threads; ``tollway backup`` runs in the middle
of that load; the load goes on; the backup is restored into a new database with
``tollway restore``; then ``ledger verify`` passes on the restored database and every ledger
entry, posting and usage record up to the backup point is there, identical, and nothing
after it. ``TOLLWAY_RESTORE_DRILL_REQUESTS`` (default 40 before and 40 after the backup) sizes
the drill; ``TOLLWAY_RESTORE_DRILL_REPORT`` appends its figures (JSON lines) to a file, as
quoted in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from fakes import Tollway
from tollway import cli
from tollway.store.db import Database, normalize_url
from tollway.store.migrate import upgrade
from tollway.store.tables import entries, postings, usage_records

HELLO = [{"role": "user", "content": "hi"}]
REQUESTS = int(os.environ.get("TOLLWAY_RESTORE_DRILL_REQUESTS", "40"))
THREADS = 4


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    """(exit code, the JSON printed, or the text printed and the error)."""
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip().startswith("{") else out + err


@pytest.fixture
def new_database(tw: Tollway, tmp_path: Path) -> Iterator[str]:
    """The URL of a new, empty database of the served one's kind."""
    if tw.db.dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'restored.db'}"
        return
    base = os.environ["TOLLWAY_TEST_POSTGRES_URL"]
    name = f"tollway_restored_{os.getpid()}"
    admin = sa.create_engine(normalize_url(base), isolation_level="AUTOCOMMIT",
                             poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield (sa.engine.make_url(normalize_url(base)).set(database=name)
               .render_as_string(hide_password=False))
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def rows(db: Database, table: sa.Table, column: sa.Column[Any], upto: int | None
         ) -> list[tuple[Any, ...]]:
    query = sa.select(table).order_by(*table.primary_key.columns)
    if upto is not None:
        query = query.where(column <= upto)
    with db.read() as conn:
        return [tuple(row) for row in conn.execute(query)]


def count_records(tw: Tollway) -> int:
    with tw.db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(usage_records)
                                .where(usage_records.c.type == "consume")).scalar_one())


def test_a_backup_under_load_restores_every_record_up_to_its_point(
        tw: Tollway, new_database: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    accounts = [tw.account(f"drill{i}", usd="100") for i in range(THREADS)]
    keys = [tw.key(a) for a in accounts]
    stop = threading.Event()
    failures: list[BaseException] = []

    def load(key: str) -> None:
        client = tw.client(key)
        try:
            while not stop.is_set():
                client.chat.completions.create(model="gpt-test", messages=HELLO)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    base = count_records(tw)
    threads = [threading.Thread(target=load, args=(k,)) for k in keys]
    for thread in threads:
        thread.start()
    try:
        while count_records(tw) < base + REQUESTS and not failures:
            time.sleep(0.05)
        path = str(tmp_path / ("tollway.backup" if tw.db.dialect == "postgresql" else
                               "tollway-backup.db"))
        code, snap = run_cli(capsys, "--database-url", tw.db.url, "--json", "backup", path)
        assert code == 0, snap
        during = count_records(tw)
        while count_records(tw) < during + REQUESTS and not failures:
            time.sleep(0.05)  # the load goes on after the backup
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert tw.verify() == []
    assert Path(path).stat().st_size == snap["bytes"] > 0

    # a backup file is never overwritten
    code, _ = run_cli(capsys, "--database-url", tw.db.url, "backup", path)
    assert code == 1

    started = time.monotonic()
    code, restored_view = run_cli(capsys, "--database-url", new_database, "--json",
                                  "restore", path)
    restore_s = time.monotonic() - started
    assert code == 0, restored_view
    assert restored_view["ledger_ok"] is True and restored_view["problems"] == []
    restored = Database(new_database)
    try:
        for table, column, last in (
                (entries, entries.c.id, snap["last_entry_id"]),
                (postings, postings.c.entry_id, snap["last_entry_id"]),
                (usage_records, usage_records.c.id, snap["last_usage_id"])):
            kept = rows(restored, table, column, None)
            assert kept == rows(tw.db, table, column, last), table.name  # identical, all there
            later = rows(tw.db, table, column, None)
            assert len(later) > len(kept), table.name  # the load went on after the backup
        code, verdict = run_cli(capsys, "--database-url", new_database, "--json", "ledger",
                                "verify")
        assert code == 0, verdict
        # a restored database holds data: a second restore is refused unless forced
        code, _ = run_cli(capsys, "--database-url", new_database, "restore", path)
        assert code == 1
        code, _ = run_cli(capsys, "--database-url", new_database, "restore", "--force", path)
        assert code == 0
        with restored.read() as conn:
            restored_records = int(conn.execute(sa.select(sa.func.count())
                                                .select_from(usage_records)).scalar_one())
    finally:
        restored.dispose()
    report = os.environ.get("TOLLWAY_RESTORE_DRILL_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(json.dumps({"backend": tw.db.dialect, "usage_records": restored_records,
                                  "backup_bytes": snap["bytes"],
                                  "backup_s": snap["seconds"],
                                  "restore_and_verify_s": round(restore_s, 3)}) + "\n")


def test_restore_refuses_a_file_that_is_not_a_backup(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all" * 100)
    url = f"sqlite:///{tmp_path / 'target.db'}"
    code, error = run_cli(capsys, "--database-url", url, "restore", str(junk))
    assert code == 1 and "is not a Tollway SQLite backup" in error
    code, _ = run_cli(capsys, "--database-url", url, "restore", str(tmp_path / "missing"))
    assert code == 1
    # an empty, migrated database is "empty": a real backup goes in without --force
    source = Database(f"sqlite:///{tmp_path / 'source.db'}")
    upgrade(source)
    source.dispose()
    target = Database(url)
    upgrade(target)
    target.dispose()
    code, _ = run_cli(capsys, "--database-url", f"sqlite:///{tmp_path / 'source.db'}",
                      "backup", str(tmp_path / "b.db"))
    assert code == 0
    code, view = run_cli(capsys, "--database-url", url, "--json", "restore",
                         str(tmp_path / "b.db"))
    assert code == 0 and view["ledger_ok"] is True
