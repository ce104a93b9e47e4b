"""``tollway notify …`` and ``tollway codes …``: notification settings and delivery, and
redemption codes (registered by :func:`tollway.cli.build_parser`)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from tollway import clock
from tollway.billing import codes
from tollway.billing import notifications as notify
from tollway.billing.views import parse_amount, parse_iso_ms
from tollway.cli import Output, open_db
from tollway.notify.deliverer import Deliverer
from tollway.store import accounts as store
from tollway.store.db import Database

_CLEAR = "none"


def cmd_notify_settings(args: argparse.Namespace) -> Output:
    body: dict[str, Any] = {}
    for option, field in (("threshold", "low_balance_threshold_usd"), ("url", "webhook_url"),
                          ("email", "email")):
        value = getattr(args, option)
        if value is not None:
            body[field] = None if value.lower() == _CLEAR else value
    notify.parse_changes(body)
    db = open_db(args)

    def op(conn: Connection) -> dict[str, Any]:
        account = store.find_account(conn, args.account)
        if not body and not args.rotate_secret:
            return notify.current(conn, account.id)
        return notify.update(conn, account.id, body, at_ms=clock.now_ms(),
                             rotate_secret=args.rotate_secret)

    view = db.run_write(op)
    text = "\n".join([
        f"account {view['account_id']} notifications:",
        f"  low-balance threshold: {view['low_balance_threshold_usd'] or 'none'} USD",
        f"  webhook URL:           {view['webhook_url'] or 'none'}",
        f"  webhook secret:        {view['webhook_secret'] or '(created on first change)'}",
        f"  email:                 {view['email'] or 'none'}"])
    return Output(view, text)


def cmd_notify_deliver(args: argparse.Namespace) -> Output:
    """One pass over everything due now (retries whose time has come included)."""
    db = open_db(args)

    async def run() -> int:
        deliverer = Deliverer(_threaded(db))
        try:
            return await deliverer.drain()
        finally:
            await deliverer.close()

    attempted = asyncio.run(run())
    return Output({"attempted": attempted}, f"attempted {attempted} deliveries")


def _threaded(db: Database) -> Callable[[Callable[[Connection], Any]], Any]:
    async def write(fn: Callable[[Connection], Any]) -> Any:
        return await asyncio.to_thread(db.run_write, fn)
    return write


def cmd_notify_list(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        account = store.find_account(conn, args.account)
        page = notify.events_page(conn, account.id, limit=args.limit)
    lines = []
    for event in page["data"]:
        lines.append(f"{event['created_at']}  {event['type']:<14} {event['id']}")
        for d in event["deliveries"]:
            last = d["attempt_log"][-1] if d["attempt_log"] else None
            lines.append(f"    {d['channel']:<8} {d['status']:<10} attempts {d['attempts']}"
                         + (f"  last: {last['error'] or 'ok'}" if last else ""))
    return Output(page, "\n".join(lines) or "no notifications yet")


def cmd_codes_create(args: argparse.Namespace) -> Output:
    amount = parse_amount(args.amount, what="--amount")
    expires = None if args.expires is None else parse_iso_ms(args.expires, what="--expires")
    db = open_db(args)
    minted = db.run_write(lambda conn: codes.mint(
        conn, amount, count=args.count, at_ms=clock.now_ms(), expires_at_ms=expires,
        note=args.note))
    views = [codes.new_code_view(c) for c in minted]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["code", "id", "amount_usd", "expires_at", "note"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(views)
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


def register(group: Callable[[str, str], Any], add: Callable[..., argparse.ArgumentParser]
             ) -> None:
    ntf = group("notify", "low-balance and top-up notifications (webhooks, email)")
    p = add(ntf, "settings", cmd_notify_settings, "show or change an account's notification "
            "settings (`none` clears a value)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--threshold", metavar="USD", help="low-balance threshold")
    p.add_argument("--url", metavar="URL", help="webhook URL")
    p.add_argument("--email", metavar="ADDRESS", help="email address (needs smtp_url)")
    p.add_argument("--rotate-secret", action="store_true", help="replace the signing secret")
    add(ntf, "deliver", cmd_notify_deliver, "deliver every notification that is due, once")
    p = add(ntf, "list", cmd_notify_list, "an account's notifications and delivery attempts")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--limit", type=int, default=20)

    cds = group("codes", "redemption codes")
    p = add(cds, "create", cmd_codes_create, "mint codes; prints CSV (code,id,amount_usd,"
            "expires_at,note): the codes are shown only now")
    p.add_argument("--amount", metavar="USD", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--expires", metavar="ISO", help="expiry time, e.g. 2027-01-01T00:00:00Z")
    p.add_argument("--note")
    p = add(cds, "list", cmd_codes_list, "codes, newest first")
    p.add_argument("--status", choices=["unused", "redeemed", "expired", "revoked"])
    p.add_argument("--limit", type=int, default=100)
    p = add(cds, "revoke", cmd_codes_revoke, "revoke an unused code")
    p.add_argument("code_id", metavar="CODE_ID", type=int)
    p = add(cds, "redeem", cmd_codes_redeem, "redeem a code into an account")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("code", metavar="CODE")
