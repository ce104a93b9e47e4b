"""The ``tollway`` command. Every command takes ``--json`` and ``--database-url``.

Errors print one line to stderr (or an error object with ``--json``) and exit 1; a database
that is not migrated says which command fixes it. Nothing prints a stack trace for bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import exc as sa_exc

from tollway import clock, settings
from tollway.billing import credits, logins, tiers
from tollway.billing import keys as key_ops
from tollway.billing.marketplace import item_unit
from tollway.billing.reports import (
    export_csv,
    export_jsonl,
    month_bounds,
    record_view,
    statement_csv,
    statement_view,
    summary_view,
)
from tollway.billing.views import (
    LIMIT_FIELDS,
    account_view,
    credit_view,
    entry_view,
    iso,
    key_view,
    parse_amount,
    parse_iso_ms,
    parse_key_limits,
    parse_signed_amount,
)
from tollway.errors import InvalidRequest, TollwayError
from tollway.ledger import ledger
from tollway.ledger.verify import verify
from tollway.money import format_usd
from tollway.pricing.catalog import load_catalog
from tollway.pricing.display import price_lines
from tollway.store import accounts as store
from tollway.store import reports as report_store
from tollway.store.accounts import Account
from tollway.store.catalog import apply_catalog, current_items
from tollway.store.db import Database
from tollway.store.migrate import current_revision, head_revision, upgrade
from tollway.store.reports import DAY_MS, HOUR_MS, LOG_TYPES, LogFilter

Handler = Callable[[argparse.Namespace], Any]


class Output:
    """What a command prints: ``data`` for --json, ``text`` lines for people."""

    def __init__(self, data: Any, text: str) -> None:
        self.data = data
        self.text = text


# --------------------------------------------------------------------------- plumbing


def open_db(args: argparse.Namespace, *, migrated: bool = True) -> Database:
    db = Database(args.database_url)
    args.opened.append(db)  # main() closes its connections when the command ends
    if migrated and current_revision(db) != head_revision():
        raise InvalidRequest(f"the database at {args.database_url} is not up to date: run "
                             "`tollway db upgrade` first")
    return db


def _key(value: str) -> str:
    return value or secrets.token_hex(16)


# --------------------------------------------------------------------------- commands


def cmd_db_upgrade(args: argparse.Namespace) -> Output:
    db = open_db(args, migrated=False)
    before = current_revision(db)
    upgrade(db)
    after = current_revision(db)
    text = (f"database is up to date (revision {after})" if before == after
            else f"database upgraded from {before or 'empty'} to revision {after}")
    return Output({"revision": after, "previous": before}, text)


def cmd_catalog_apply(args: argparse.Namespace) -> Output:
    catalog = load_catalog(args.file)
    db = open_db(args)
    with db.write() as conn:
        report = apply_catalog(conn, catalog, now_ms=clock.now_ms())
    lines = [(f"applied {args.file}: {len(catalog.models)} models, "
              f"{len(catalog.endpoints)} endpoints, {len(catalog.groups)} groups")]
    lines += [f"  new price version: {item} (effective {iso(ms)})"
              for item, ms in report.new_versions]
    if report.unchanged:
        lines.append(f"  unchanged: {', '.join(report.unchanged)}")
    if report.deactivated:
        lines.append(f"  no longer listed: {', '.join(report.deactivated)}")
    data = {"new_versions": [{"item": i, "effective_from": iso(ms)}
                             for i, ms in report.new_versions],
            "unchanged": report.unchanged, "deactivated": report.deactivated,
            "groups": report.groups}
    return Output(data, "\n".join(lines))


def cmd_catalog_show(args: argparse.Namespace) -> Output:
    from tollway.billing.marketplace import listing

    db = open_db(args)
    with db.read() as conn:
        data = listing(conn, now_ms=clock.now_ms())
        items = current_items(conn, now_ms=clock.now_ms())
    lines = ["groups: " + ", ".join(f"{g} ×{r}" for g, r in data["groups"].items())]
    width = max((len(i.id) for i in items), default=10)
    for item in items:
        where = (f" {item.spec.method} /apis/v1{item.spec.path}"
                 if item.spec.is_endpoint else "")
        lines.append(f"{item.id:<{width}}  {item.billing_type:<8}  {item.provider}{where}")
        lines += [f"{'':<{width}}    {line}"
                  for line in price_lines(item.version.price, per=item_unit(item))]
        if item.version.group_ratios:
            lines.append(f"{'':<{width}}    group overrides: " + ", ".join(
                f"{g} ×{r}" for g, r in sorted(item.version.group_ratios.items())))
    if not items:
        lines.append("the catalog is empty: run `tollway catalog apply FILE`")
    return Output(data, "\n".join(lines))


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
        conn, args.account, amount, kind=kind, idempotency_key=key, note=args.note))
    return account, credit_view(result)


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
    if not values:
        raise InvalidRequest("nothing to change: give at least one of --rpm, --tpm, "
                             "--concurrency, --daily-cap, --weekly-cap, --monthly-cap, --ips")
    db = open_db(args)
    with db.write() as conn:
        limits = parse_key_limits(values, store.get_key(conn, args.key_id).limits)
        record = key_ops.set_limits(conn, args.key_id, limits)
    view = key_view(record)
    shown = ", ".join(f"{f}={view[f]}" for f in LIMIT_FIELDS if view[f] is not None)
    return Output(view, f"key {record.id} ({record.prefix}…) limits: {shown or 'none'}")


def cmd_accounts_set_tier(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.write() as conn:
        account = tiers.set_tier(conn, args.account, args.tier)
    return Output(account_view(account), f"account {account.id} ({account.name}) is now in "
                  f"tier {account.tier}")


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


def cmd_history(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        account = store.find_account(conn, args.account)
        rows = [entry_view(e) for e in store.recent_entries(conn, account.id, limit=args.limit)]
    lines = [f"{r['created_at']}  {r['kind']:<7} {r['amount_usd']:>16} USD"
             + (f"  hold {r['hold_id']}" if r["hold_id"] else "")
             + (f"  {r['note']}" if r["note"] else "") for r in rows]
    return Output(rows, "\n".join(lines) or "no activity yet")


# --------------------------------------------------------------------------- usage log


def _usage_filter(args: argparse.Namespace, account_id: int) -> LogFilter:
    if args.model and args.endpoint:
        raise InvalidRequest("give --model or --endpoint, not both")
    if args.type is not None and args.type not in LOG_TYPES:
        raise InvalidRequest(f"--type must be one of {', '.join(LOG_TYPES)}, got {args.type!r}")
    if args.billing_type is not None and args.billing_type not in ("token", "per_call"):
        raise InvalidRequest(f"--billing-type must be token or per_call, got "
                             f"{args.billing_type!r}")
    if args.key is not None and args.key < 1:
        raise InvalidRequest(f"--key must be a key id, got {args.key}")
    return LogFilter(account_id=account_id,
                     start_ms=parse_iso_ms(args.start, what="--start") if args.start else None,
                     end_ms=parse_iso_ms(args.end, what="--end") if args.end else None,
                     product=args.model or args.endpoint or None, key_id=args.key,
                     group=args.group or None, type=args.type, billing_type=args.billing_type,
                     review=args.review)


def _usage_line(view: dict[str, Any]) -> str:
    """time, type, product, tokens or calls, cost (requests) or credit (other activity)."""
    if view["type"] in ("consume", "error"):
        if view["billing_type"] == "per_call":
            what = f"{view['calls']} call" + ("" if view["calls"] == 1 else "s")
        else:
            what = f"{view['input_tokens']} in"
            if view["cached_input_tokens"]:
                what += f" ({view['cached_input_tokens']} cached)"
            what += f" / {view['output_tokens']} out"
        if view["error_code"]:
            what += f" [{view['error_code']}]"
        money = f"{view['cost_usd']} USD"
    else:
        what = view["note"] or ""
        money = "" if view["credit_usd"] == format_usd(0) else f"{view['credit_usd']} USD"
    return (f"{view['created_at']}  {view['type']:<10} {view['product'] or '-':<20} "
            f"{what:<36} {money:>20}  {view['request_id']}")


def _stream(chunks: Iterable[bytes]) -> None:
    """Write an export to stdout as it is produced; a reader that went away (``| head``)
    ends it quietly."""
    try:
        for chunk in chunks:
            sys.stdout.write(chunk.decode())
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit


def cmd_usage(args: argparse.Namespace) -> Output | None:
    if args.limit < 1 or args.limit > 1000:
        raise InvalidRequest(f"--limit must be from 1 to 1000, got {args.limit}")
    if args.format not in ("table", "csv", "jsonl"):
        raise InvalidRequest(f"--format must be table, csv or jsonl, got {args.format!r}")
    if args.format != "table" and args.cursor:
        raise InvalidRequest(f"--format {args.format} exports the whole range: drop --cursor")
    db = open_db(args)
    with db.read() as conn:
        account = store.find_account(conn, args.account)
        where = _usage_filter(args, account.id)
        if args.format != "table":  # the whole filtered range, in keyset chunks
            every = report_store.iter_usage(conn, where)
            _stream(export_csv(every) if args.format == "csv" else export_jsonl(every))
            return None
        rows, cursor = report_store.usage_page(conn, where, limit=args.limit,
                                               cursor=args.cursor or None)
    data = [record_view(r) for r in rows]
    lines = [_usage_line(v) for v in data] or [
        f"no records for account {account.id} ({account.name}) with these filters"]
    if cursor is not None:
        lines.append(f"next page: --cursor {cursor}")
    return Output({"object": "list", "data": data, "next_cursor": cursor,
                   "has_more": cursor is not None}, "\n".join(lines))


MAX_RETENTION_DAYS = 100_000


def cmd_usage_prune(args: argparse.Namespace) -> Output:
    days, batch = args.older_than_days, args.batch
    if not 1 <= days <= MAX_RETENTION_DAYS:
        raise InvalidRequest(f"--older-than-days must be from 1 to {MAX_RETENTION_DAYS}, "
                             f"got {days}")
    if batch < 1:
        raise InvalidRequest(f"--batch must be at least 1, got {batch}")
    db = open_db(args)
    before = clock.now_ms() - days * DAY_MS
    deleted = 0
    while True:  # one short transaction per batch: the gateway keeps writing meanwhile
        with db.write() as conn:
            count = report_store.prune_usage(conn, before_ms=before, limit=batch)
        deleted += count
        if count:
            print(f"deleted {deleted} records…", file=sys.stderr, flush=True)
        if count < batch:
            break
    return Output({"deleted": deleted, "before": iso(before)},
                  f"deleted {deleted} usage records older than {iso(before)}; ledger "
                  "postings, summaries and statements are unchanged")


# --------------------------------------------------------------------------- summaries


def _whole_hours(args: argparse.Namespace) -> tuple[int, int]:
    """The period in whole UTC hours (the rollups' grain), as the API takes it: start rounds
    down, end up; default the last 30 days."""
    end = parse_iso_ms(args.end, what="--end") if args.end else clock.now_ms()
    start = parse_iso_ms(args.start, what="--start") if args.start else end - 30 * DAY_MS
    if start >= end:
        raise InvalidRequest("--start must be before --end")
    return start - start % HOUR_MS, end + (-end % HOUR_MS)


def _counters_text(row: dict[str, Any]) -> str:
    text = f"requests {row['requests']}"
    if row["errors"]:
        text += f" (+{row['errors']} failed)"
    if row["input_tokens"] or row["output_tokens"]:
        text += f", {row['input_tokens']} in"
        if row["cached_input_tokens"]:
            text += f" ({row['cached_input_tokens']} cached)"
        text += f" / {row['output_tokens']} out tokens"
    if row["calls"]:
        text += f", {row['calls']} calls"
    return text + f", cost {row['cost_usd']} USD"


def cmd_summary(args: argparse.Namespace) -> Output:
    group_by = [g.strip() for g in (args.by or "").split(",") if g.strip()]
    start, end = _whole_hours(args)
    db = open_db(args)
    with db.read() as conn:
        account = store.find_account(conn, args.account)
        rows, totals = report_store.summary(conn, account_id=account.id, start_ms=start,
                                            end_ms=end, group_by=group_by)
    view = summary_view(rows, totals, start_ms=start, end_ms=end)
    view["account"] = {"id": account.id, "balance_usd": format_usd(account.balance_nano),
                       "held_usd": format_usd(account.held_nano),
                       "available_usd": format_usd(account.available_nano)}
    t = view["totals"]
    lines = [f"account {account.id} ({account.name}), {view['start']} to {view['end']}",
             f"  {_counters_text(t)}",
             f"  average {t['average_rpm']} requests/min, {t['average_tpm']} tokens/min",
             (f"  balance {view['account']['balance_usd']} USD (held "
              f"{view['account']['held_usd']})")]
    if group_by:
        lines.append(f"by {', '.join(group_by)}:")
        for row in view["data"]:
            labels = " ".join(f"{k}={v}" for k, v in row.items()
                              if k not in t and k != "cost_usd")
            lines.append(f"  {labels}  {_counters_text(row)}")
        if not view["data"]:
            lines.append("  nothing in this period")
    return Output(view, "\n".join(lines))


def cmd_statement(args: argparse.Namespace) -> Output | None:
    if args.format not in ("text", "json", "csv", "html"):
        raise InvalidRequest(f"--format must be json, csv or html, got {args.format!r}")
    start, end = month_bounds(args.month)
    db = open_db(args)
    with db.read() as conn:
        account = store.find_account(conn, args.account)
        view = statement_view(account, args.month,
                              report_store.statement(conn, account.id, start_ms=start,
                                                     end_ms=end))
    if args.format == "csv":
        _stream([statement_csv(view).encode()])
        return None
    if args.format == "html":
        from tollway.api.reports import statement_html

        _stream([statement_html(view).encode()])
        return None
    if args.format == "json":
        return Output(view, json.dumps(view, indent=2))
    lines = [f"statement for account {account.id} ({account.name}), {args.month}"]
    lines += [f"  {label:<16} {view[key]:>20} USD" for label, key in (
        ("opening balance", "opening_balance_usd"), ("top-ups", "topups_usd"),
        ("adjustments", "adjustments_usd"), ("charges paid", "charges_usd"),
        ("written off", "written_off_usd"), ("closing balance", "closing_balance_usd"))]
    lines.append(f"  {view['reconciliation']} USD")
    if view["charges_by_product"]:
        lines.append("charges by product:")
        lines += [f"  {p['product']:<20} {p['billing_type']:<8} {p['requests']:>8} requests "
                  f"{p['cost_usd']:>20} USD" for p in view["charges_by_product"]]
    return Output(view, "\n".join(lines))


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


def cmd_serve(args: argparse.Namespace) -> Output:
    from tollway.server import serve

    serve(args)
    return Output({}, "")


class LedgerInvalid(TollwayError):
    status = 500
    code = "ledger_invalid"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("ledger verification FAILED:\n  " + "\n  ".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--database-url", default=argparse.SUPPRESS, metavar="URL",
                        help="default: $TOLLWAY_DATABASE_URL or sqlite:///var/tollway.db")
    parser = argparse.ArgumentParser(
        prog="tollway", parents=[common],
        description="Tollway: an API marketplace gateway with exact usage-based billing.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help,
                                                       description=help)
        p.set_defaults(handler=handler)
        return p

    def limit_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rpm", metavar="N", help="requests per minute (at most the tier's)")
        p.add_argument("--tpm", metavar="N", help="tokens per minute (at most the tier's)")
        p.add_argument("--concurrency", metavar="N",
                       help="requests in flight (at most the tier's)")
        p.add_argument("--daily-cap", metavar="USD", help="spend cap per calendar day")
        p.add_argument("--weekly-cap", metavar="USD", help="spend cap per week (from Monday)")
        p.add_argument("--monthly-cap", metavar="USD", help="spend cap per calendar month")
        p.add_argument("--ips", metavar="CIDR,CIDR", help="IP allowlist (IPv4 and IPv6)")

    def group(name: str, help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help)
        return p.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")

    p = add(sub, "serve", cmd_serve, "run the HTTP service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--catalog", metavar="FILE", help="apply this catalog file before serving")
    p.add_argument("--demo", action="store_true",
                   help="ensure a demo account with credit and a demo key, and print them")

    db = group("db", "database schema")
    add(db, "upgrade", cmd_db_upgrade, "create or migrate the schema to the newest revision")

    cat = group("catalog", "models, data APIs and prices")
    p = add(cat, "apply", cmd_catalog_apply, "load a catalog file; changed prices become new "
            "price versions")
    p.add_argument("file", metavar="FILE")
    add(cat, "show", cmd_catalog_show, "print the catalog with billing types and prices")

    acc = group("accounts", "customer accounts")
    p = add(acc, "create", cmd_accounts_create, "create a customer account")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--group", default="default")
    p.add_argument("--email", help="email address for the web console sign-in")
    p.add_argument("--password-stdin", action="store_true",
                   help="read an initial console password from standard input")
    add(acc, "list", cmd_accounts_list, "list accounts with balances")
    p = add(acc, "set-tier", cmd_accounts_set_tier, "put an account in a rate-limit tier of "
            "the catalog (up or down)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("tier", metavar="TIER")
    p = add(acc, "set-password", cmd_accounts_set_password,
            "set an account's console password (read from standard input)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--email", help="also set the sign-in email ('' removes it)")
    for name, handler, text in (
            ("disable", cmd_accounts_disable, "refuse an account's keys and console sign-in"),
            ("enable", cmd_accounts_enable, "enable a disabled account")):
        p = add(acc, name, handler, text)
        p.add_argument("account", metavar="ACCOUNT", help="account id or name")

    p = add(sub, "balance", cmd_balance, "show an account's balance")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")

    p = add(sub, "topup", cmd_topup, "credit an account's prepaid balance")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("amount_usd", metavar="AMOUNT_USD", help="decimal USD, e.g. 25.00")
    p.add_argument("--note")
    p.add_argument("--idempotency-key", default="",
                   help="repeat a top-up safely: the same key credits once")

    p = add(sub, "adjust", cmd_adjust, "operator correction: credit (+) or debit (-) an account")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("amount_usd", metavar="AMOUNT_USD", help="signed decimal USD, e.g. -1.50")
    p.add_argument("--note", required=True, help="why (kept in the ledger)")
    p.add_argument("--idempotency-key", default="")

    keys = group("keys", "API keys")
    p = add(keys, "create", cmd_keys_create, "create an API key (the secret is shown once)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--name")
    p.add_argument("--group", help="pin the key to a price group")
    p.add_argument("--models", help="comma-separated catalog ids the key may use")
    p.add_argument("--quota", metavar="USD", help="the key's own spending limit")
    p.add_argument("--expires", metavar="ISO", help="expiry time, e.g. 2027-01-01T00:00:00Z")
    limit_flags(p)
    p = add(keys, "update", cmd_keys_update, "change an API key's limits (none clears one)")
    p.add_argument("key_id", metavar="KEY_ID", type=int)
    limit_flags(p)
    p = add(keys, "revoke", cmd_keys_revoke, "revoke an API key")
    p.add_argument("key_id", metavar="KEY_ID", type=int)
    p = add(keys, "list", cmd_keys_list, "list an account's keys")
    p.add_argument("account", metavar="ACCOUNT")

    p = add(sub, "history", cmd_history, "an account's ledger entries, newest first")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--limit", type=int, default=50)

    p = add(sub, "usage", cmd_usage, "an account's usage log (requests, top-ups, adjustments, "
            "key events), newest first; `tollway usage prune` deletes old records")
    p.epilog = ("tollway usage prune --older-than-days N [--batch B]: delete raw records older "
                "than N days (an account named 'prune' is reached by its id)")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--start", metavar="ISO", help="from this time (inclusive)")
    p.add_argument("--end", metavar="ISO", help="until this time (exclusive)")
    p.add_argument("--model", metavar="ID", help="one model")
    p.add_argument("--endpoint", metavar="ID", help="one data API endpoint")
    p.add_argument("--key", metavar="KEY_ID", type=int, help="one API key")
    p.add_argument("--type", metavar="T", help=", ".join(LOG_TYPES))
    p.add_argument("--group", metavar="G", help="price group")
    p.add_argument("--billing-type", metavar="B", help="token or per_call")
    p.add_argument("--review", action="store_true",
                   help="only records to review: usage capped at the request's bounds or "
                        "estimated locally (usage_source capped or estimated)")
    p.add_argument("--limit", metavar="N", type=int, default=50,
                   help="records per page (table)")
    p.add_argument("--cursor", metavar="C", help="the next page, as the previous one printed")
    p.add_argument("--format", default="table", metavar="FMT",
                   help="table (one page), csv or jsonl (the whole range, streamed)")
    # `usage prune` (main() routes it here; argparse cannot give one command both an
    # ACCOUNT positional and subcommands). No help=: not listed among the commands.
    help_ = "delete raw usage records older than N days; never postings, rollups or statements"
    p = sub.add_parser("usage-prune", parents=[common], prog="tollway usage prune",
                       description=help_)
    p.set_defaults(handler=cmd_usage_prune)
    p.add_argument("--older-than-days", metavar="N", type=int,
                   default=int(settings.get("usage_retention_days")),
                   help="default: $TOLLWAY_USAGE_RETENTION_DAYS (400)")
    p.add_argument("--batch", metavar="B", type=int, default=10_000,
                   help="records deleted per transaction")

    p = add(sub, "summary", cmd_summary, "an account's usage by period, from the hourly rollups")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--by", metavar="G,…", help="any of " + ", ".join(report_store.GROUP_BY))
    p.add_argument("--start", metavar="ISO", help="default: 30 days before --end (rounded "
                   "down to the hour)")
    p.add_argument("--end", metavar="ISO", help="default: now (rounded up to the hour)")

    p = add(sub, "statement", cmd_statement, "an account's monthly statement: opening balance, "
            "top-ups, adjustments, charges, closing balance")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--month", metavar="YYYY-MM", required=True)
    p.add_argument("--format", default="text", metavar="FMT",
                   help="json, csv or html (default: text; --json is json)")

    led = group("ledger", "ledger maintenance")
    add(led, "verify", cmd_ledger_verify, "recompute every balance from postings; exit 1 on any "
        "violation")
    add(led, "expire-holds", cmd_ledger_expire, "release holds past their deadline now")

    from tollway import cli_channels, cli_notify  # import this module: registered once loaded

    cli_notify.register(group, add)
    cli_channels.register(group, add, sub)
    return parser


def _route_usage_prune(argv: list[str]) -> list[str]:
    """``usage prune …`` → the hidden command ``usage-prune …`` (global options may come
    first, and ``--json`` / ``--database-url URL`` between the two words)."""
    def skip(i: int) -> int:
        while i < len(argv) and argv[i].startswith("-"):
            i += 2 if argv[i] == "--database-url" else 1
        return i

    command = skip(0)
    if argv[command:command + 1] != ["usage"]:
        return argv
    word = skip(command + 1)
    if argv[word:word + 1] != ["prune"]:
        return argv
    return [*argv[:command], "usage-prune", *argv[command + 1:word], *argv[word + 1:]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_route_usage_prune(list(sys.argv[1:] if argv is None else argv)))
    args.json = getattr(args, "json", False)
    args.database_url = getattr(args, "database_url", None) or settings.get("database_url")
    args.opened = []
    try:
        out = args.handler(args)
    except TollwayError as exc:
        return _fail(args, exc.code, exc.message)
    except sa_exc.OperationalError as exc:
        return _fail(args, "storage_unavailable", f"cannot use the database at "
                     f"{args.database_url}: {exc.orig}")
    except KeyboardInterrupt:
        return 130
    finally:
        for db in args.opened:
            db.dispose()
    if out is None:  # the command wrote its output itself (an export)
        return 0
    if args.json:
        print(json.dumps(out.data, indent=2))
    elif out.text:
        print(out.text)
    return 0


def _fail(args: argparse.Namespace, code: str, message: str) -> int:
    if args.json:
        print(json.dumps({"error": {"code": code, "message": message}}, indent=2))
    print(f"tollway: error: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
