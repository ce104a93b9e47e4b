"""``tollway notify …``: notification settings and delivery."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from tollway import clock, settings
from tollway.billing import notifications as notify
from tollway.cli.common import Commands, Output, open_db
from tollway.notify import targets
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
    targets.check_saved_sync(body)
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


def cmd_notify_prune(args: argparse.Namespace) -> Output:
    """Delete notification events older than the retention, with deliveries and attempts."""
    db = open_db(args)

    async def run() -> int:
        deliverer = Deliverer(_threaded(db))
        try:
            return await deliverer.prune(older_than_days=args.older_than_days)
        finally:
            await deliverer.close()

    pruned = asyncio.run(run())
    return Output({"pruned_events": pruned}, f"pruned {pruned} notification events")


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



def register(c: Commands) -> None:
    ntf = c.group("notify", "low-balance and top-up notifications (webhooks, email)")
    p = c.add(ntf, "settings", cmd_notify_settings, "show or change an account's notification "
              "settings (`none` clears a value)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--threshold", metavar="USD", help="low-balance threshold")
    p.add_argument("--url", metavar="URL", help="webhook URL")
    p.add_argument("--email", metavar="ADDRESS", help="email address (needs smtp_url)")
    p.add_argument("--rotate-secret", action="store_true", help="replace the signing secret")
    c.add(ntf, "deliver", cmd_notify_deliver, "deliver every notification that is due, once")
    p = c.add(ntf, "prune", cmd_notify_prune, "delete notification events (with deliveries "
              "and attempts) older than the retention; pending ones stay")
    p.add_argument("--older-than-days", metavar="N", type=int,
                   default=int(settings.get("notify_retention_days")),
                   help="default: $TOLLWAY_NOTIFY_RETENTION_DAYS (90)")
    p = c.add(ntf, "list", cmd_notify_list, "an account's notifications and delivery attempts")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--limit", type=int, default=20)
