"""``tollway auto-recharge show|set|disable ACCOUNT``: an account's auto-recharge."""

from __future__ import annotations

import argparse
from typing import Any

from sqlalchemy.engine import Connection

from tollway import clock
from tollway.billing import auto_recharge
from tollway.cli.common import Commands, Output, open_db
from tollway.store import accounts as store


def _run(args: argparse.Namespace, body: dict[str, Any] | None, *,
         disable: bool = False) -> Output:
    db = open_db(args)

    def op(conn: Connection) -> dict[str, Any]:
        account = store.find_account(conn, args.account)
        if disable:
            return auto_recharge.disable(conn, account.id, at_ms=clock.now_ms())
        if body is not None:
            return auto_recharge.save(conn, account.id, body, at_ms=clock.now_ms())
        return auto_recharge.view(conn, account.id, at_ms=clock.now_ms())

    view = db.run_write(op)
    return Output(view, text(view))


def text(view: dict[str, Any]) -> str:
    state = ("paused after failures" if view["paused"] else "on" if view["enabled"] else "off")
    lines = [f"account {view['account_id']} auto-recharge: {state}",
             (f"  below {view['threshold_usd'] or '-'} USD, charge to {view['target_usd'] or '-'}"
             f" USD, at most {view['monthly_cap_usd'] or '-'} USD a month"),
             (f"  this month: charged {view['charged_this_month_usd']} USD, left "
             f"{view['left_this_month_usd'] or '-'} USD"),
             (f"  card saved: {'yes' if view['card_saved'] else 'no'}; consecutive failures: "
             f"{view['consecutive_failures']}")]
    lines += [f"  #{a['id']} {a['created_at']} {a['amount_usd']} USD {a['status']}"
              + (f" ({a['error']})" if a["error"] else "") for a in view["attempts"]]
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> Output:
    return _run(args, None)


def cmd_set(args: argparse.Namespace) -> Output:
    body: dict[str, Any] = {"enabled": True}
    for option, field in (("threshold", "threshold_usd"), ("target", "target_usd"),
                          ("monthly_cap", "monthly_cap_usd")):
        if getattr(args, option) is not None:
            body[field] = getattr(args, option)
    return _run(args, body)


def cmd_disable(args: argparse.Namespace) -> Output:
    return _run(args, None, disable=True)


def register(c: Commands) -> None:
    grp = c.group("auto-recharge", "charge an account's saved card when its balance runs low")
    p = c.add(grp, "show", cmd_show, "an account's auto-recharge setting and recent charges")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p = c.add(grp, "set", cmd_set, "enable (or resume) auto-recharge; amounts are USD with at "
              "most 2 decimals, kept from the current setting when left out")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--threshold", metavar="USD", help="charge when available falls below this")
    p.add_argument("--target", metavar="USD", help="bring the available balance to this")
    p.add_argument("--monthly-cap", metavar="USD", help="at most this much charged a month")
    p = c.add(grp, "disable", cmd_disable, "stop charging the card (the card stays saved)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
