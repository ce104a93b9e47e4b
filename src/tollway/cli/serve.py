"""``tollway serve`` and ``tollway db upgrade``."""

from __future__ import annotations

import argparse

from tollway.cli.common import Commands, Output, open_db
from tollway.store.migrate import current_revision, upgrade


def cmd_serve(args: argparse.Namespace) -> Output:
    from tollway.server import serve

    serve(args)
    return Output({}, "")


def cmd_db_upgrade(args: argparse.Namespace) -> Output:
    db = open_db(args, migrated=False)
    before = current_revision(db)
    upgrade(db)
    after = current_revision(db)
    text = (f"database is up to date (revision {after})" if before == after
            else f"database upgraded from {before or 'empty'} to revision {after}")
    return Output({"revision": after, "previous": before}, text)



def register(c: Commands) -> None:
    p = c.add(c.sub, "serve", cmd_serve, "run the HTTP service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--catalog", metavar="FILE", help="apply this catalog file before serving")
    p.add_argument("--demo", action="store_true",
                   help="ensure a demo account with credit and a demo key, and print them")

    db = c.group("db", "database schema")
    c.add(db, "upgrade", cmd_db_upgrade, "create or migrate the schema to the newest revision")
