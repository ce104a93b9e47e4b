"""``tollway keys …``: API keys and their limits."""

from __future__ import annotations

import argparse
from typing import Any

from tollway import clock
from tollway.billing import keys as key_ops
from tollway.billing.views import (
    LIMIT_FIELDS,
    iso,
    key_view,
    parse_amount,
    parse_iso_ms,
    parse_key_limits,
)
from tollway.cli.common import Commands, Output, open_db
from tollway.errors import InvalidRequest
from tollway.store import accounts as store


def cmd_keys_create(args: argparse.Namespace) -> Output:
    quota = None if args.quota is None else parse_amount(args.quota, what="--quota")
    expires = None if args.expires is None else parse_iso_ms(args.expires, what="--expires")
    models = None if args.models is None else [m.strip() for m in args.models.split(",")
                                               if m.strip()]
    limits = parse_key_limits(_limit_values(args))
    db = open_db(args)
    with db.write() as conn:
        account = store.find_account(conn, args.account)
        new = key_ops.create_key(conn, account.id, at_ms=clock.now_ms(), name=args.name,
                                 group=args.group, models=models, quota_nano=quota,
                                 expires_at_ms=expires, limits=limits)
    view = key_view(new.record, secret=new.secret)
    return Output(view, f"created key {new.record.id} for account {account.id} "
                  f"({account.name}):\n\n    {new.secret}\n\nstore it now: it is not shown "
                  "again.")


#: ``keys create`` / ``keys update`` flags → the API's limit fields.
_LIMIT_FLAGS = {"rpm": "rpm", "tpm": "tpm", "concurrency": "concurrency",
                "daily_cap": "daily_cap_usd", "weekly_cap": "weekly_cap_usd",
                "monthly_cap": "monthly_cap_usd", "ips": "allowed_ips"}


def _limit_values(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags given; ``none`` clears one (``keys update``)."""
    return {field: None if value.strip().lower() == "none" else value
            for flag, field in _LIMIT_FLAGS.items()
            if (value := getattr(args, flag, None)) is not None}


def cmd_keys_update(args: argparse.Namespace) -> Output:
    values = _limit_values(args)
    group = getattr(args, "group", None)
    if not values and group is None:
        raise InvalidRequest("nothing to change: give at least one of --group, --rpm, --tpm, "
                             "--concurrency, --daily-cap, --weekly-cap, --monthly-cap, --ips")
    db = open_db(args)
    with db.write() as conn:
        record = store.get_key(conn, args.key_id)
        if group is not None:  # the operator's pin ('none': the account's group)
            record = key_ops.pin_group(conn, args.key_id,
                                       None if group.lower() == "none" else group,
                                       at_ms=clock.now_ms())
        if values:
            record = key_ops.set_limits(conn, args.key_id,
                                        parse_key_limits(values, record.limits))
    view = key_view(record)
    shown = ", ".join(f"{f}={view[f]}" for f in LIMIT_FIELDS if view[f] is not None)
    return Output(view, f"key {record.id} ({record.prefix}…) group {view['effective_group']}, "
                  f"limits: {shown or 'none'}")


def cmd_keys_revoke(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.write() as conn:
        record = key_ops.revoke_key(conn, args.key_id, at_ms=clock.now_ms())
    return Output(key_view(record), f"key {record.id} ({record.prefix}…) revoked at "
                  f"{iso(record.revoked_at_ms)}")


def cmd_keys_list(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        account = store.find_account(conn, args.account)
        rows = [key_view(k) for k in store.list_keys(conn, account.id)]
    lines = [f"{r['id']:>6}  {r['prefix']}…  {r['name'] or '':<16} group "
             f"{r['effective_group']:<10} used {r['used_usd']}"
             + (f" of {r['quota_usd']}" if r["quota_usd"] else "")
             + (" REVOKED" if r["revoked_at"] else "") for r in rows]
    return Output(rows, "\n".join(lines) or "no keys")



def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", metavar="N", help="requests per minute (at most the tier's)")
    p.add_argument("--tpm", metavar="N", help="tokens per minute (at most the tier's)")
    p.add_argument("--concurrency", metavar="N", help="requests in flight (at most the tier's)")
    p.add_argument("--daily-cap", metavar="USD", help="spend cap per calendar day")
    p.add_argument("--weekly-cap", metavar="USD", help="spend cap per week (from Monday)")
    p.add_argument("--monthly-cap", metavar="USD", help="spend cap per calendar month")
    p.add_argument("--ips", metavar="CIDR,CIDR", help="IP allowlist (IPv4 and IPv6)")


def register(c: Commands) -> None:
    keys = c.group("keys", "API keys")
    p = c.add(keys, "create", cmd_keys_create, "create an API key (the secret is shown once)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--name")
    p.add_argument("--group", help="pin the key to a price group")
    p.add_argument("--models", help="comma-separated catalog ids the key may use")
    p.add_argument("--quota", metavar="USD", help="the key's own spending limit")
    p.add_argument("--expires", metavar="ISO", help="expiry time, e.g. 2027-01-01T00:00:00Z")
    _limit_flags(p)
    p = c.add(keys, "update", cmd_keys_update, "change an API key's price group or limits "
              "(none clears one)")
    p.add_argument("key_id", metavar="KEY_ID", type=int)
    p.add_argument("--group", help="pin the key to a price group (none: the account's group)")
    _limit_flags(p)
    p = c.add(keys, "revoke", cmd_keys_revoke, "revoke an API key")
    p.add_argument("key_id", metavar="KEY_ID", type=int)
    p = c.add(keys, "list", cmd_keys_list, "list an account's keys")
    p.add_argument("account", metavar="ACCOUNT")
