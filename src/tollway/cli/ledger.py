"""``tollway ledger …``: verify the ledger, release expired holds."""

from __future__ import annotations

import argparse
import sys

from tollway.cli.common import Commands, Output, open_db
from tollway.errors import TollwayError
from tollway.ledger import ledger
from tollway.ledger.verify import verify
from tollway.money import format_usd


def cmd_ledger_verify(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        problems = verify(conn)
    if problems:
        raise LedgerInvalid(problems)
    return Output({"ok": True, "problems": []}, "ledger verified: every balance equals its "
                  "postings, postings sum to zero, every hold closed at most once")


def cmd_ledger_expire(args: argparse.Namespace) -> Output:
    db = open_db(args)
    released = []
    while True:
        with db.write() as conn:
            batch = ledger.expire_holds(conn, limit=500)
        released += batch
        if len(batch) < 500:
            break
        print(f"released {len(released)} expired holds so far…", file=sys.stderr)
    total = sum(r.released_nano for r in released)
    return Output({"released": len(released), "released_usd": format_usd(total)},
                  f"released {len(released)} expired holds ({format_usd(total)} USD)")


class LedgerInvalid(TollwayError):
    status = 500
    code = "ledger_invalid"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("ledger verification FAILED:\n  " + "\n  ".join(problems))
        self.problems = problems



def register(c: Commands) -> None:
    led = c.group("ledger", "ledger maintenance")
    c.add(led, "verify", cmd_ledger_verify, "recompute every balance from postings; exit 1 on "
          "any violation")
    c.add(led, "expire-holds", cmd_ledger_expire, "release holds past their deadline now")
