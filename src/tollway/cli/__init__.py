"""The ``tollway`` command. Every command takes ``--json`` and ``--database-url``.

Errors print one line to stderr (or an error object with ``--json``) and exit 1; a database
that is not migrated says which command fixes it. Nothing prints a stack trace for bad input.

One module per command group registers its commands (``register``); :mod:`.common` holds what
they share (output, opening the database, error reporting).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy import exc as sa_exc

from tollway import settings
from tollway.cli import (
    accounts,
    auto_recharge,
    backup,
    catalog,
    channels,
    codes,
    grants,
    keys,
    ledger,
    notify,
    reports,
    serve,
)
from tollway.cli.common import Commands, Output, emit, fail, open_db
from tollway.cli.reports import route_usage_prune
from tollway.errors import TollwayError

__all__ = ["Output", "build_parser", "main", "open_db"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL",
                        help="default: $TOLLWAY_DATABASE_URL or sqlite:///var/tollway.db")
    parser = argparse.ArgumentParser(
        prog="tollway", parents=[common],
        description="Tollway: an API marketplace gateway with exact usage-based billing.")
    commands = Commands(parser.add_subparsers(dest="command", required=True,
                                              metavar="COMMAND"), common)
    # the order of `tollway --help`
    for group in (serve, catalog, channels, accounts, keys, reports, ledger, backup, notify,
                  codes,
                  grants, auto_recharge):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(route_usage_prune(list(sys.argv[1:] if argv is None else argv)))
    args.json = getattr(args, "json", False)
    args.database_url = getattr(args, "database_url", None) or settings.get("database_url")
    args.opened = []
    try:
        out = args.handler(args)
    except TollwayError as exc:
        return fail(args, exc.code, exc.message)
    except sa_exc.OperationalError as exc:
        return fail(args, "storage_unavailable", f"cannot use the database at "
                    f"{args.database_url}: {exc.orig}")
    except KeyboardInterrupt:
        return 130
    finally:
        for db in args.opened:
            db.dispose()
    if out is not None:  # None: the command wrote its output itself (an export)
        emit(args, out)
    return 0
