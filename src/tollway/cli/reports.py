"""``tollway history``, ``usage`` (and ``usage prune``), ``summary`` and ``statement``: what an
account did and paid."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from tollway import clock, settings
from tollway.billing.reports import (
    STATEMENT_LINES,
    export_csv,
    export_jsonl,
    month_bounds,
    record_view,
    statement_csv,
    statement_view,
    summary_view,
)
from tollway.billing.views import (
    entry_view,
    iso,
    parse_iso_ms,
)
from tollway.cli.common import Commands, Output, open_db
from tollway.errors import InvalidRequest
from tollway.money import format_usd
from tollway.store import accounts as store
from tollway.store import reports as report_store
from tollway.store import responses as response_store
from tollway.store.reports import DAY_MS, HOUR_MS, LOG_TYPES, LogFilter


def cmd_history(args: argparse.Namespace) -> Output:
    db = open_db(args)
    with db.read() as conn:
        account = store.find_account(conn, args.account)
        rows = [entry_view(e) for e in store.recent_entries(conn, account.id, limit=args.limit)]
    lines = [f"{r['created_at']}  {r['kind']:<7} {r['amount_usd']:>16} USD"
             + (f"  hold {r['hold_id']}" if r["hold_id"] else "")
             + (f"  {r['note']}" if r["note"] else "") for r in rows]
    return Output(rows, "\n".join(lines) or "no activity yet")


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
    with db.write() as conn:  # the Responses ids remembered as long as their usage
        forgotten = response_store.forget_before(conn, before_ms=before)
    return Output({"deleted": deleted, "before": iso(before),
                   "responses_forgotten": forgotten},
                  f"deleted {deleted} usage records older than {iso(before)}; ledger "
                  "postings, summaries and statements are unchanged")


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
    lines += [f"  {label:<20} {view[key]:>20} USD" for label, key in STATEMENT_LINES]
    lines.append(f"  {view['reconciliation']} USD")
    lines.append(f"  promotional: {view['promotional_reconciliation']} USD")
    if view["charges_by_product"]:
        lines.append("charges by product:")
        lines += [f"  {p['product']:<20} {p['billing_type']:<8} {p['requests']:>8} requests "
                  f"{p['cost_usd']:>20} USD" for p in view["charges_by_product"]]
    return Output(view, "\n".join(lines))


def route_usage_prune(argv: list[str]) -> list[str]:
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



def register(c: Commands) -> None:
    p = c.add(c.sub, "history", cmd_history, "an account's ledger entries, newest first")
    p.add_argument("account", metavar="ACCOUNT")
    p.add_argument("--limit", type=int, default=50)

    p = c.add(c.sub, "usage", cmd_usage, "an account's usage log (requests, top-ups, "
              "adjustments, key events), newest first; `tollway usage prune` deletes old records")
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
    # `usage prune` (main() routes it here with route_usage_prune; argparse cannot give one
    # command both an ACCOUNT positional and subcommands). No help=: not listed among the
    # commands.
    help_ = "delete raw usage records older than N days; never postings, rollups or statements"
    p = c.sub.add_parser("usage-prune", parents=[c.common], prog="tollway usage prune",
                         description=help_)
    p.set_defaults(handler=cmd_usage_prune)
    p.add_argument("--older-than-days", metavar="N", type=int,
                   default=int(settings.get("usage_retention_days")),
                   help="default: $TOLLWAY_USAGE_RETENTION_DAYS (400)")
    p.add_argument("--batch", metavar="B", type=int, default=10_000,
                   help="records deleted per transaction")

    p = c.add(c.sub, "summary", cmd_summary,
              "an account's usage by period, from the hourly rollups")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--by", metavar="G,…", help="any of " + ", ".join(report_store.GROUP_BY)
                   + " (model: every model, image models too; endpoint: the data APIs)")
    p.add_argument("--start", metavar="ISO", help="default: 30 days before --end (rounded "
                   "down to the hour)")
    p.add_argument("--end", metavar="ISO", help="default: now (rounded up to the hour)")

    p = c.add(c.sub, "statement", cmd_statement, "an account's monthly statement: opening "
              "balance, top-ups, adjustments, charges, closing balance")
    p.add_argument("account", metavar="ACCOUNT", help="account id or name")
    p.add_argument("--month", metavar="YYYY-MM", required=True)
    p.add_argument("--format", default="text", metavar="FMT",
                   help="json, csv or html (default: text; --json is json)")
