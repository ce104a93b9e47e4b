"""``tollway backup PATH`` and ``tollway restore PATH``; the work is in
:mod:`tollway.store.backup`."""

from __future__ import annotations

import argparse

from tollway.cli.common import Commands, Output, open_db
from tollway.ledger.verify import verify
from tollway.store import backup as store
from tollway.store.db import Database
from tollway.store.migrate import upgrade


def cmd_backup(args: argparse.Namespace) -> Output:
    db = open_db(args)
    snap = store.backup(db, args.path)
    data = {"path": snap.path, "bytes": snap.bytes, "seconds": round(snap.seconds, 3),
            "last_entry_id": snap.last_entry_id, "last_usage_id": snap.last_usage_id,
            "accounts": snap.accounts}
    return Output(data, f"backed up {db.dialect} to {snap.path} ({snap.bytes} bytes, "
                  f"{snap.seconds:.2f} s): {snap.accounts} accounts, ledger entries up to "
                  f"{snap.last_entry_id}, usage records up to {snap.last_usage_id}")


def cmd_restore(args: argparse.Namespace) -> Output:
    db = Database(args.database_url)
    args.opened.append(db)
    store.restore(db, args.path, force=args.force)
    upgrade(db)  # a backup from an older release is migrated to this one
    with db.read() as conn:
        problems = verify(conn)
    data = {"path": args.path, "database": db.dialect, "ledger_ok": not problems,
            "problems": problems}
    verdict = "ledger verified" if not problems else "LEDGER PROBLEMS:\n  " + "\n  ".join(
        problems)
    return Output(data, f"restored {args.path} into the {db.dialect} database; {verdict}")


def register(c: Commands) -> None:
    p = c.add(c.sub, "backup", cmd_backup, "write a consistent copy of the database while it "
              "serves (SQLite: the online backup API; PostgreSQL: pg_dump)")
    p.add_argument("path", metavar="PATH", help="the backup file (must not exist)")
    p = c.add(c.sub, "restore", cmd_restore, "restore a backup into the configured database, "
              "which must hold no data (stop the server first)")
    p.add_argument("path", metavar="PATH", help="a file written by `tollway backup`")
    p.add_argument("--force", action="store_true",
                   help="replace a database that holds data")
