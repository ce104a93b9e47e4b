"""``tollway grants …``: promotional credit."""

from __future__ import annotations

import argparse
import secrets

from tollway import clock
from tollway.billing import grants
from tollway.billing.views import parse_amount, parse_iso_ms
from tollway.cli.common import Commands, Output, open_db
from tollway.money import format_usd


def cmd_grants_add(args: argparse.Namespace) -> Output:
    amount = parse_amount(args.amount_usd, what="AMOUNT_USD")
    expires = None if args.expires is None else parse_iso_ms(args.expires, what="--expires")
    db = open_db(args)
    view = db.run_write(lambda conn: grants.add(
        conn, args.account, amount, reason=args.reason, expires_at_ms=expires,
        at_ms=clock.now_ms(), idempotency_key=args.idempotency_key or secrets.token_hex(16)))
    return Output(view, f"granted {view['amount_usd']} USD of promotional credit to account "
                  f"{view['account_id']} (grant {view['id']}, expires "
                  f"{view['expires_at'] or 'never'}): {view['available_usd']} USD available")


def cmd_grants_list(args: argparse.Namespace) -> Output:
    db = open_db(args)
    page = db.run_write(lambda conn: grants.listing(conn, args.account, at_ms=clock.now_ms()))
    lines = [f"{g['id']:>6}  {g['amount_usd']:>16} USD  left {g['remaining_usd']:>16}  "
             f"expires {g['expires_at'] or 'never'}  {g['reason']}" for g in page["data"]]
    return Output(page["data"], "\n".join(lines) or "no grants")


def cmd_grants_expire(args: argparse.Namespace) -> Output:
    db = open_db(args)
    taken = db.run_write(lambda conn: grants.expire_due(conn, at_ms=clock.now_ms()))
    return Output({"taken_usd": format_usd(taken)},
                  f"took back {format_usd(taken)} USD of expired promotional credit")


def register(c: Commands) -> None:
    grp = c.group("grants", "promotional credit (spent first; may expire)")
    p = c.add(grp, "add", cmd_grants_add, "grant promotional credit to an account")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("amount_usd", metavar="AMOUNT_USD")
    p.add_argument("--reason", required=True, help="why (shown to the customer)")
    p.add_argument("--expires", metavar="ISO", help="expiry time, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--idempotency-key", help="a repeat with the same key grants nothing more")
    p = c.add(grp, "list", cmd_grants_list, "an account's grants and what each has left")
    p.add_argument("account", metavar="ACCOUNT")
    c.add(grp, "expire", cmd_grants_expire, "take back expired promotional credit now (the "
          "server does this every reaper interval)")
