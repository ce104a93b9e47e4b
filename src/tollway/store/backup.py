"""Backups and restores of the whole database.

SQLite: ``sqlite3``'s online backup API copies every page in one step under one read
transaction, so the copy is the database exactly as it was at one instant, while the server
keeps serving (WAL: readers never block the writer, and the writer never blocks the copy).
PostgreSQL: ``pg_dump`` in its custom format (one consistent snapshot, REPEATABLE READ) and
``pg_restore`` (see the README's Operations section for base backups and point-in-time
recovery, which suit large databases better).

A restore goes into the configured database only when it holds no data (no customer
account, no ledger entry), unless forced: a restore replaces everything.
"""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from tollway.errors import InvalidRequest
from tollway.store.db import Database


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a backup holds: its size, how long it took, and its newest ledger entry and
    usage record (every older one is in it too)."""
    path: str
    bytes: int
    seconds: float
    last_entry_id: int
    last_usage_id: int
    accounts: int


def has_data(db: Database) -> bool:
    """Whether the database holds anything a restore would destroy."""
    with db.read() as conn:
        names = set(sa.inspect(conn).get_table_names())
        if "accounts" not in names:
            return False
        customers = conn.execute(sa.text(
            "SELECT count(*) FROM accounts WHERE kind = 'customer'")).scalar_one()
        entries = conn.execute(sa.text("SELECT count(*) FROM entries")).scalar_one() \
            if "entries" in names else 0
    return bool(customers or entries)


def _sqlite_path(db: Database) -> str:
    path = sa.engine.make_url(db.url).database
    if not path or path == ":memory:":
        raise InvalidRequest("an in-memory SQLite database cannot be backed up or restored")
    return path


def _describe(db: Database, path: str, started: float) -> Snapshot:
    with db.read() as conn:
        def last(table: str) -> int:
            return int(conn.execute(sa.text(f"SELECT coalesce(max(id), 0) FROM {table}"))
                       .scalar_one())
        accounts = int(conn.execute(sa.text(
            "SELECT count(*) FROM accounts WHERE kind = 'customer'")).scalar_one())
        return Snapshot(path, Path(path).stat().st_size, time.monotonic() - started,
                        last("entries"), last("usage_records"), accounts)


def backup(db: Database, path: str) -> Snapshot:
    """Write a consistent copy of ``db`` to ``path`` (which must not exist)."""
    target = Path(path)
    if target.exists():
        raise InvalidRequest(f"{path} exists: a backup never overwrites a file")
    started = time.monotonic()
    if db.dialect == "sqlite":
        source = sqlite3.connect(_sqlite_path(db))
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy)  # every page in one step: one instant's database
        finally:
            copy.close()
            source.close()
        partial.rename(target)
        copied = Database(f"sqlite:///{target}")
        try:
            return _describe(copied, str(target), started)
        finally:
            copied.dispose()
    # pg_dump reads the snapshot this transaction exported: the ids below are exactly the
    # newest the dump holds
    with db.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
        with conn.begin():
            snapshot_id = conn.execute(sa.text("SELECT pg_export_snapshot()")).scalar_one()
            last = {t: int(conn.execute(sa.text(f"SELECT coalesce(max(id), 0) FROM {t}"))
                           .scalar_one()) for t in ("entries", "usage_records")}
            accounts = int(conn.execute(sa.text(
                "SELECT count(*) FROM accounts WHERE kind = 'customer'")).scalar_one())
            _run(db, [_pg_tool("pg_dump"), "--format=custom", "--no-owner",
                      "--no-privileges", f"--snapshot={snapshot_id}", f"--file={target}"])
    return Snapshot(str(target), target.stat().st_size, time.monotonic() - started,
                    last["entries"], last["usage_records"], accounts)


def restore(db: Database, path: str, *, force: bool = False) -> None:
    """Replace ``db`` with the backup at ``path``; refuse a database with data unless
    ``force``. The caller migrates the result (an older backup is upgraded)."""
    source = Path(path)
    if not source.is_file():
        raise InvalidRequest(f"no backup file at {path}")
    if not force and has_data(db):
        shown = sa.engine.make_url(db.url).render_as_string(hide_password=True)
        raise InvalidRequest(f"the database at {shown} already holds data: a restore would "
                             "replace it; use --force to do so anyway")
    if db.dialect == "sqlite":
        backup_db = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            check = backup_db.execute("PRAGMA quick_check").fetchone()
            tables = {r[0] for r in backup_db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if check != ("ok",) or not {"alembic_version", "entries"} <= tables:
                raise InvalidRequest(f"{path} is not a Tollway SQLite backup")
            db.dispose()
            target = sqlite3.connect(_sqlite_path(db))
            try:
                backup_db.backup(target)  # page by page: the target becomes the backup
            finally:
                target.close()
        except sqlite3.DatabaseError as exc:
            raise InvalidRequest(f"{path} is not a Tollway SQLite backup ({exc})") from None
        finally:
            backup_db.close()
        return
    db.dispose()
    _run(db, [_pg_tool("pg_restore"), "--clean", "--if-exists", "--no-owner",
              "--no-privileges", "--single-transaction", "--exit-on-error",
              f"--dbname={sa.engine.make_url(db.url).database}", str(source)])


def _pg_tool(name: str) -> str:
    """``pg_dump`` / ``pg_restore``: from ``TOLLWAY_PG_BIN_DIR``, the PATH, or Debian's
    ``/usr/lib/postgresql/<version>/bin`` (the newest)."""
    from tollway import settings
    configured = settings.get("pg_bin_dir")
    if configured:
        return str(Path(configured) / name)
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return candidates[-1]
    raise InvalidRequest(f"{name} was not found: install the PostgreSQL client tools or set "
                         "TOLLWAY_PG_BIN_DIR")


def _run(db: Database, command: list[str]) -> None:
    """Run a PostgreSQL client tool against ``db`` (connection details in the environment,
    so the password is never on a command line)."""
    url = sa.engine.make_url(db.url)
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGHOST": url.host or "",
           "PGPORT": str(url.port or 5432), "PGUSER": url.username or "",
           "PGDATABASE": url.database or ""}
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    for name, value in url.query.items():  # e.g. sslmode
        if name == "sslmode":
            env["PGSSLMODE"] = str(value)
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        tool = Path(command[0]).name
        raise InvalidRequest(f"{tool} failed: {result.stderr.strip()[-2000:]}")
