"""``tollway accounts …``, ``balance``, ``topup`` and ``adjust``: customer accounts and their
credit."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any

from tollway import clock
from tollway.billing import credits, logins, tiers
from tollway.billing.views import (
    account_view,
    credit_view,
    parse_amount,
    parse_signed_amount,
)
from tollway.cli.common import Commands, Output, open_db
from tollway.store import accounts as store
from tollway.store.accounts import Account


def _stdin_password() -> str:
    """A password from standard input (never argv, which other users can read): the first
    line, without its line ending."""
    line = sys.stdin.readline()
    return line.removesuffix("\n").removesuffix("\r")


def cmd_accounts_create(args: argparse.Namespace) -> Output:
    password_hash = logins.hash_password(_stdin_password()) if args.password_stdin else None
    db = open_db(args)
    with db.write() as conn:
        account = logins.create_account(conn, args.name, args.group, email=args.email,
                                        password_hash=password_hash)
    view = account_view(account)
    login = " with a console login" if password_hash else ""
    return Output(view, f"created account {account.id} ({account.name}, group "
                        f"{account.group}){login}")


def cmd_accounts_set_password(args: argparse.Namespace) -> Output:
    password_hash = logins.hash_password(_stdin_password())
    db = open_db(args)
    with db.write() as conn:
        account = logins.set_password_hash(conn, store.find_account(conn, args.account).id,
                                           password_hash)
        if args.email is not None:
            account = store.set_email(conn, account.id, args.email or None)
    return Output(account_view(account), f"password set for account {account.id} "
                  f"({account.name}); its console sessions were ended")


def cmd_accounts_disable(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.write() as conn:
        account = logins.disable_account(conn, store.find_account(conn, args.account).id)
    return Output(account_view(account), f"disabled account {account.id} ({account.name}): "
                  "its keys and console sign-in are refused")


def cmd_accounts_enable(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.write() as conn:
        account = logins.enable_account(conn, store.find_account(conn, args.account).id)
    return Output(account_view(account), f"enabled account {account.id} ({account.name})")


def cmd_accounts_list(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        rows = [account_view(a) for a in store.list_accounts(conn)]
    lines = [f"{r['id']:>6}  {r['name']:<24} {r['group']:<10} available {r['available_usd']}  "
             f"held {r['held_usd']}  used {r['used_usd']}" for r in rows]
    return Output(rows, "\n".join(lines) or "no accounts yet")


def cmd_accounts_set_tier(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.write() as conn:
        account = tiers.set_tier(conn, args.account, args.tier)
    return Output(account_view(account), f"account {account.id} ({account.name}) is now in "
                  f"tier {account.tier}")


def cmd_balance(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        view = account_view(store.find_account(conn, args.account))
    return Output(view, f"account {view['id']} ({view['name']}): balance {view['balance_usd']} "
                  f"USD = available {view['available_usd']} + held {view['held_usd']}; used "
                  f"{view['used_usd']} over {view['requests']} requests")


def cmd_topup(args: argparse.Namespace) -> Output:
    account, view = _credit(args, "topup", parse_amount(args.amount_usd, what="AMOUNT_USD"))
    return Output(view, f"topped up {view['amount_usd']} USD: account {account.id} "
                  f"({account.name}) now has {view['available_usd']} USD available")


def cmd_adjust(args: argparse.Namespace) -> Output:
    amount = parse_signed_amount(args.amount_usd, what="AMOUNT_USD")
    account, view = _credit(args, "adjustment", amount)
    return Output(view, f"adjusted account {account.id} by {view['amount_usd']} USD: "
                  f"{view['available_usd']} USD available")


def _credit(args: argparse.Namespace, kind: str, amount: int) -> tuple[Account, dict[str, Any]]:
    db = open_db(args)
    key = _key(args.idempotency_key)
    account, result = db.run_write(lambda conn: credits.credit(
        conn, args.account, amount, kind=kind, idempotency_key=key, note=args.note,
        at_ms=clock.now_ms()))
    return account, credit_view(result)


def _key(value: str) -> str:
    return value or secrets.token_hex(16)



def register(c: Commands) -> None:
    acc = c.group("accounts", "customer accounts")
    p = c.add(acc, "create", cmd_accounts_create, "create a customer account")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--group", default="default")
    p.add_argument("--email", help="email address for the web console sign-in")
    p.add_argument("--password-stdin", action="store_true",
                   help="read an initial console password from standard input")
    c.add(acc, "list", cmd_accounts_list, "list accounts with balances")
    p = c.add(acc, "set-tier", cmd_accounts_set_tier, "put an account in a rate-limit tier of "
              "the catalog (up or down)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("tier", metavar="TIER")
    p = c.add(acc, "set-password", cmd_accounts_set_password,
              "set an account's console password (read from standard input)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--email", help="also set the sign-in email ('' removes it)")
    for name, handler, text in (
            ("disable", cmd_accounts_disable, "refuse an account's keys and console sign-in"),
            ("enable", cmd_accounts_enable, "enable a disabled account")):
        p = c.add(acc, name, handler, text)
        p.add_argument("account", metavar="ACCOUNT", help="account id or name")

    p = c.add(c.sub, "balance", cmd_balance, "show an account's balance")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")

    p = c.add(c.sub, "topup", cmd_topup, "credit an account's prepaid balance")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("amount_usd", metavar="AMOUNT_USD", help="decimal USD, e.g. 25.00")
    p.add_argument("--note")
    p.add_argument("--idempotency-key", default="",
                   help="repeat a top-up safely: the same key credits once")

    p = c.add(c.sub, "adjust", cmd_adjust,
              "operator correction: credit (+) or debit (-) an account")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("amount_usd", metavar="AMOUNT_USD", help="signed decimal USD, e.g. -1.50")
    p.add_argument("--note", required=True, help="why (kept in the ledger)")
    p.add_argument("--idempotency-key", default="")
