"""What every command shares: the parser's building blocks, the database it opens, what it
prints (``--json`` or text) and how it reports an error."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from tollway.errors import InvalidRequest
from tollway.store.db import Database
from tollway.store.migrate import current_revision, head_revision

Handler = Callable[[argparse.Namespace], Any]


class Output:
    """What a command prints: ``data`` for --json, ``text`` lines for people."""

    def __init__(self, data: Any, text: str) -> None:
        self.data = data
        self.text = text


class Commands:
    """The parser under construction: each command module registers its commands here."""

    def __init__(self, sub: Any, common: argparse.ArgumentParser) -> None:
        self.sub = sub  # the top-level subparsers
        self.common = common  # --json and --database-url, accepted by every command

    def add(self, parent: Any, name: str, handler: Handler, help: str
            ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[self.common], help=help,
                                                       description=help)
        p.set_defaults(handler=handler)
        return p

    def group(self, name: str, help: str) -> Any:
        p = self.sub.add_parser(name, help=help, description=help)
        return p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")


def open_db(args: argparse.Namespace, *, migrated: bool = True) -> Database:
    db = Database(args.database_url)
    args.opened.append(db)  # main() closes its connections when the command ends
    if migrated and current_revision(db) != head_revision():
        raise InvalidRequest(f"the database at {args.database_url} is not up to date: run "
                             "`tollway db upgrade` first")
    return db


def emit(args: argparse.Namespace, out: Output) -> None:
    if args.json:
        print(json.dumps(out.data, indent=2))
    elif out.text:
        print(out.text)


def fail(args: argparse.Namespace, code: str, message: str) -> int:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}, indent=2))
    print(f"tollway: error: {message}", file=sys.stderr)
    return 1
