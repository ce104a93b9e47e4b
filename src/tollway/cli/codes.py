"""``tollway codes …``: redemption codes."""

from __future__ import annotations

import argparse
import csv
import io
from typing import Any

from sqlalchemy.engine import Connection

from tollway import clock
from tollway.billing import codes
from tollway.billing.csv_cells import cell as csv_cell
from tollway.billing.views import parse_amount, parse_iso_ms
from tollway.cli.common import Commands, Output, open_db
from tollway.store import accounts as store


def cmd_codes_create(args: argparse.Namespace) -> Output:
    amount = parse_amount(args.amount, what="--amount")
    expires = None if args.expires is None else parse_iso_ms(args.expires, what="--expires")
    db = open_db(args)
    minted = db.run_write(lambda conn: codes.mint(
        conn, amount, count=args.count, at_ms=clock.now_ms(), expires_at_ms=expires,
        note=args.note, credit_days=args.credit_expires_days))
    views = [codes.new_code_view(c) for c in minted]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["code", "id", "amount_usd", "expires_at",
                                                 "credit_expires_days", "note"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in view.items()} for view in views)
    return Output(views, out.getvalue().rstrip("\n"))


def cmd_codes_list(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        page = codes.page(conn, limit=args.limit, cursor=None, status=args.status,
                          now_ms=clock.now_ms())
    lines = [f"{c['id']:>6}  {c['hint']}  {c['amount_usd']:>16} USD  "
             + ("redeemed by " + str(c["redeemed_by"]) if c["redeemed_at"]
                else "revoked" if c["revoked_at"] else "expires " + (c["expires_at"] or "never"))
             + (f"  {c['note']}" if c["note"] else "") for c in page["data"]]
    return Output(page["data"], "\n".join(lines) or "no codes")


def cmd_codes_revoke(args: argparse.Namespace) -> Output:
    db = open_db(args)
    view = db.run_write(lambda conn: codes.revoke(conn, args.code_id, at_ms=clock.now_ms()))
    return Output(view, f"code {view['id']} ({view['hint']}) revoked")


def cmd_codes_redeem(args: argparse.Namespace) -> Output:
    db = open_db(args)

    def op(conn: Connection) -> dict[str, Any]:
        account = store.find_account(conn, args.account)
        return codes.redemption_view(codes.redeem(conn, account.id, args.code,
                                                  clock.now_ms()))

    view = db.run_write(op)
    return Output(view, f"redeemed {view['amount_usd']} USD into account "
                  f"{view['account_id']}: {view['available_usd']} USD available")



def register(c: Commands) -> None:
    cds = c.group("codes", "redemption codes")
    p = c.add(cds, "create", cmd_codes_create, "mint codes of promotional credit; prints CSV "
              "(code,id,amount_usd,expires_at,credit_expires_days,note): the codes are shown "
              "only now")
    p.add_argument("--amount", metavar="USD", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--expires", metavar="ISO",
                   help="last time the code can be redeemed, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--credit-expires-days", metavar="N", type=int,
                   help="the credit a redemption grants expires N days later (default: never)")
    p.add_argument("--note")
    p = c.add(cds, "list", cmd_codes_list, "codes, newest first")
    p.add_argument("--status", choices=["unused", "redeemed", "expired", "revoked"])
    p.add_argument("--limit", type=int, default=100)
    p = c.add(cds, "revoke", cmd_codes_revoke, "revoke an unused code")
    p.add_argument("code_id", metavar="CODE_ID", type=int)
    p = c.add(cds, "redeem", cmd_codes_redeem, "redeem a code into an account")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("code", metavar="CODE")
