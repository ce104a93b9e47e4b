"""``tollway usage``, ``usage prune``, ``summary``, ``statement`` and ``history``, in-process on
SQLite and PostgreSQL, over :func:`test_reports.standard_books`."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from test_reports import (
    DAY,
    Books,
    month_statement,
    ms,
    raw_summary,
    standard_books,
)

import tollway.clock
from fakes import fresh_database
from tollway.cli import main
from tollway.money import format_usd
from tollway.store import reports as store
from tollway.store.db import Database
from tollway.store.reports import LogFilter
from tollway.store.tables import usage_records


def run(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--database-url", url])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> Any:
    code, out, err = run(capsys, url, *args, "--json")
    assert (code, err) == (0, ""), (args, out, err)
    return json.loads(out)


def fails(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> str:
    """A refused command: exit 1 and one line on stderr (and with --json, an error object)."""
    code, out, err = run(capsys, url, *args)
    assert (code, out) == (1, ""), (args, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tollway: error: "), err
    code, out, _ = run(capsys, url, *args, "--json")
    assert code == 1 and json.loads(out)["error"]["message"] == lines[0].removeprefix(
        "tollway: error: ")
    return lines[0]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def books(request: pytest.FixtureRequest) -> Iterator[Books]:
    with fresh_database(request) as db:
        yield standard_books(db)


# --------------------------------------------------------------------------- usage


def test_usage_table_one_line_per_record_and_the_next_page(
        books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    url = books.db.url
    expected = books.expect(LogFilter(account_id=books.accounts["alice"]))
    seen: list[str] = []
    lines_by_id: dict[str, str] = {}
    args = ["usage", "alice", "--limit", "6"]
    pages = 0
    while True:
        code, out, err = run(capsys, url, *args)
        assert (code, err) == (0, "")
        lines = out.splitlines()
        pages += 1
        more = lines[-1].startswith("next page: --cursor ")
        for line in lines[:-1] if more else lines:
            request_id = line.split()[-1]
            seen.append(request_id)
            lines_by_id[request_id] = line
        if not more:
            break
        assert len(lines) == 7
        args = ["usage", "alice", "--limit", "6", "--cursor", lines[-1].split()[-1]]
    assert seen == expected and pages == -(-len(expected) // 6)

    h6 = lines_by_id[books.tags["h6"].request_id]
    assert re.match(r"^2025-10-31T02:07:00Z\s+consume\s+chat-a\s+10 in \(3 cached\) / 1 out\s+"
                    r"0\.000001875 USD\s+req-\d+$", h6), h6
    edge2 = lines_by_id[books.tags["edge2"].request_id]
    assert re.match(r"^2025-11-01T06:00:00Z\s+consume\s+search-c\s+1 call\s+"
                    r"0\.002000000 USD\s+req-\d+$", edge2), edge2
    failed = [line for line in lines_by_id.values() if " error " in line]
    assert failed and all("[upstream_error]" in line and "0.000000000 USD" in line
                          for line in failed)
    topups = [line for line in lines_by_id.values() if " topup " in line]
    assert len(topups) == 1 and "20.000000000 USD" in topups[0]
    adjustment = next(line for line in lines_by_id.values() if " adjustment " in line)
    assert "-0.500000000 USD" in adjustment
    revoked = next(line for line in lines_by_id.values() if line.endswith("-revoked"))
    assert "API key tw-" in revoked and "revoked" in revoked

    code, out, _ = run(capsys, url, "usage", "alice", "--start", "2030-01-01T00:00:00Z")
    assert code == 0 and out.startswith("no records for account ")


def test_usage_json_filters(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    url = books.db.url
    alice = books.accounts["alice"]
    a_ci = books.keys["a-ci"].id
    cases: list[tuple[list[str], LogFilter]] = [
        (["--model", "chat-a"], LogFilter(account_id=alice, product="chat-a")),
        (["--endpoint", "search-c", "--type", "consume"],
         LogFilter(account_id=alice, product="search-c", type="consume")),
        (["--key", str(a_ci)], LogFilter(account_id=alice, key_id=a_ci)),
        (["--group", "vip"], LogFilter(account_id=alice, group="vip")),
        (["--type", "system"], LogFilter(account_id=alice, type="system")),
        (["--billing-type", "per_call"], LogFilter(account_id=alice, billing_type="per_call")),
        (["--start", "2025-10-31T05:00:00Z", "--end", "2025-11-01T06:00:00Z"],
         LogFilter(account_id=alice, start_ms=ms("2025-10-31T05:00:00Z"),
                   end_ms=ms("2025-11-01T06:00:00Z"))),
        (["--key", str(books.keys["b-main"].id)],
         LogFilter(account_id=alice, key_id=books.keys["b-main"].id)),
    ]
    for extra, where in cases:
        body = ok(capsys, url, "usage", str(alice), "--limit", "1000", *extra)
        assert [i["request_id"] for i in body["data"]] == books.expect(where), extra
        assert body["next_cursor"] is None and body["has_more"] is False
    page = ok(capsys, url, "usage", "alice", "--limit", "2")
    assert page["has_more"] is True and len(page["data"]) == 2
    assert page["data"][0]["pricing"] is not None or page["data"][0]["type"] not in (
        "consume", "error")
    rest = ok(capsys, url, "usage", "alice", "--limit", "1000", "--cursor", page["next_cursor"])
    assert [i["request_id"] for i in page["data"] + rest["data"]] == books.expect(
        LogFilter(account_id=alice))


def test_usage_csv_and_jsonl_stream_the_whole_range(
        books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    url = books.db.url
    bob = books.accounts["bob"]
    code, out, err = run(capsys, url, "usage", "bob", "--format", "csv", "--limit", "1")
    assert (code, err) == (0, "")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["request_id"] for r in table] == books.expect(LogFilter(account_id=bob))
    costs = {r.request_id: r.cost_nano for r in books.rows}
    assert all(r["cost_usd"] == format_usd(costs[r["request_id"]]) for r in table)
    # --json does not wrap an export
    code, out, err = run(capsys, url, "--json", "usage", "bob", "--format", "jsonl",
                         "--model", "chat-a")
    assert (code, err) == (0, "")
    items = [json.loads(line) for line in out.splitlines()]
    assert [i["request_id"] for i in items] == books.expect(
        LogFilter(account_id=bob, product="chat-a"))
    assert all(i["pricing"]["rounded_usd"] == i["cost_usd"] for i in items
               if i["type"] == "consume")


def test_usage_refuses_bad_input(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    url = books.db.url
    for args, message in (
            (["--type", "bogus"], "--type must be one of"),
            (["--billing-type", "monthly"], "--billing-type must be"),
            (["--model", "chat-a", "--endpoint", "search-c"], "not both"),
            (["--endpoint", "search\x00"], "product must not contain NUL characters"),
            (["--cursor", "garbage"], "cursor is not one this API returned"),
            (["--limit", "0"], "--limit must be from 1 to 1000"),
            (["--key", "0"], "--key must be a key id"),
            (["--start", "yesterday"], "--start must be an ISO 8601 time"),
            (["--format", "xml"], "--format must be table, csv or jsonl"),
            (["--format", "csv", "--cursor", "MTIzLjQ"], "drop --cursor")):
        assert message in fails(capsys, url, "usage", "alice", *args), args
    assert "no account named 'nobody'" in fails(capsys, url, "usage", "nobody")
    with pytest.raises(SystemExit) as exited:
        main(["usage", "alice", "--limit", "x", "--database-url", url])
    assert exited.value.code == 2
    capsys.readouterr()


def test_history_is_the_ledger(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    entries = ok(capsys, books.db.url, "history", "bob", "--limit", "500")
    kinds = {e["kind"] for e in entries}
    assert kinds == {"topup", "hold", "settle", "void"}
    assert sum(e["kind"] == "topup" for e in entries) == 2
    code, out, _ = run(capsys, books.db.url, "history", "bob", "--limit", "3")
    assert code == 0 and len(out.splitlines()) == 3


# --------------------------------------------------------------------------- summary


def test_summary(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    url = books.db.url
    carol = books.accounts["carol"]
    with books.db.read() as conn:
        raw = conn.execute(sa.select(usage_records)
                           .where(usage_records.c.account_id == carol)).all()
    start, end = ms("2025-10-31T00:00:00Z"), ms("2025-11-02T00:00:00Z")
    body = ok(capsys, url, "summary", "carol", "--by", "model,day", "--start",
              "2025-10-31T00:00:00Z", "--end", "2025-11-01T23:59:59Z")
    assert (body["start"], body["end"]) == ("2025-10-31T00:00:00Z", "2025-11-02T00:00:00Z")
    groups, totals = raw_summary(raw, ["model", "day"], start, end)
    assert body["totals"]["cost_usd"] == format_usd(totals["cost_nano"])
    assert body["totals"]["requests"] == totals["requests"] > 0
    got = {(row["product"], ms(row["day"])): (row["requests"], row["input_tokens"],
                                               row["output_tokens"], row["cost_usd"])
           for row in body["data"]}
    assert got == {k: (v["requests"], v["input_tokens"], v["output_tokens"],
                       format_usd(v["cost_nano"])) for k, v in groups.items()}
    assert body["account"]["id"] == carol

    code, out, err = run(capsys, url, "summary", "carol", "--by", "key", "--start",
                         "2025-10-31T00:00:00Z", "--end", "2025-11-02T00:00:00Z")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == (f"account {carol} (carol), 2025-10-31T00:00:00Z to "
                        "2025-11-02T00:00:00Z")
    assert f"cost {format_usd(totals['cost_nano'])} USD" in lines[1]
    assert lines[4] == "by key:"
    assert sorted(line.split()[0] for line in lines[5:]) == sorted(
        f"key_id={books.keys[k].id}" for k in ("c-main", "c-half"))
    assert "key_name=c-half" in out

    assert "group_by must be among" in fails(capsys, url, "summary", "carol", "--by", "week")
    assert "--start must be before --end" in fails(
        capsys, url, "summary", "carol", "--start", "2025-11-02T00:00:00Z", "--end",
        "2025-11-01T00:00:00Z")
    # default: the last 30 days, which hold nothing of 2025
    empty = ok(capsys, url, "summary", "carol", "--by", "model")
    assert empty["data"] == [] and empty["totals"]["requests"] == 0


# --------------------------------------------------------------------------- statement


def test_statement(books: Books, capsys: pytest.CaptureFixture[str]) -> None:
    url = books.db.url
    bob = books.accounts["bob"]
    for month in ("2025-10", "2025-11"):
        want = month_statement(books.db, bob, month)
        assert ok(capsys, url, "statement", "bob", "--month", month) == want
        code, out, err = run(capsys, url, "statement", str(bob), "--month", month, "--format",
                             "json")
        assert (code, err) == (0, "") and json.loads(out) == want
    november = month_statement(books.db, bob, "2025-11")

    code, out, _ = run(capsys, url, "statement", "bob", "--month", "2025-11")
    lines = out.splitlines()
    assert code == 0 and lines[0] == f"statement for account {bob} (bob), 2025-11"
    assert f"  {november['reconciliation']} USD" in lines
    assert any(line.split()[:2] == ["closing", "balance"]
               and line.split()[2] == november["closing_balance_usd"] for line in lines)
    assert "charges by product:" in lines

    code, out, _ = run(capsys, url, "statement", "bob", "--month", "2025-11", "--format", "csv")
    rows = list(csv.reader(io.StringIO(out)))
    assert code == 0 and rows[0] == ["line", "product", "requests", "amount_usd"]
    assert ["closing balance", "", "", november["closing_balance_usd"]] in rows
    code, out, _ = run(capsys, url, "statement", "bob", "--month", "2025-11", "--format",
                       "html")
    assert code == 0 and out.startswith("<!doctype html>")
    assert "Statement for 2025-11" in out and november["closing_balance_usd"] in out

    assert "month must be YYYY-MM" in fails(capsys, url, "statement", "bob", "--month",
                                            "2025-13")
    assert "--format must be" in fails(capsys, url, "statement", "bob", "--month", "2025-10",
                                       "--format", "pdf")
    with pytest.raises(SystemExit):
        main(["statement", "bob", "--database-url", url])  # --month is required
    capsys.readouterr()


# --------------------------------------------------------------------------- prune


def _untouchable(db: Database, books: Books) -> dict[str, Any]:
    """Everything a prune must leave as it was: ledger, rollups, wallet days, and the
    summaries and statements read from them."""
    state: dict[str, Any] = {}
    with db.read() as conn:
        for table in ("entries", "postings", "holds", "accounts", "api_keys", "usage_rollups",
                      "wallet_days"):
            state[table] = sorted(tuple(str(v) for v in row)
                                  for row in conn.execute(sa.text(f"SELECT * FROM {table}")))
        for account in (*books.accounts.values(), None):
            for group_by in ([], ["model", "day"], ["endpoint", "key"], ["hour"]):
                rows, totals = store.summary(conn, account_id=account,
                                             start_ms=ms("2025-10-01T00:00:00Z"),
                                             end_ms=ms("2025-12-01T00:00:00Z"),
                                             group_by=group_by)
                state[f"summary {account} {group_by}"] = (
                    [{k: str(v) for k, v in row.items()} for row in rows], totals)
    for account in books.accounts.values():
        for month in ("2025-10", "2025-11"):
            state[f"statement {account} {month}"] = month_statement(db, account, month)
    return state


@pytest.fixture
def clean_books(db: Database) -> Books:
    return standard_books(db)


def test_usage_prune_deletes_old_records_only(
        clean_books: Books, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    books, url = clean_books, clean_books.db.url
    now = ms("2025-11-02T00:00:00Z")
    monkeypatch.setattr(tollway.clock, "now_ms", lambda: now)
    cutoff = now - DAY
    old = [r.request_id for r in books.rows if r.at < cutoff]
    kept = [r.request_id for r in books.rows if r.at >= cutoff]
    assert len(old) == 51 and len(kept) == 10
    before = _untouchable(books.db, books)

    for days in ("0", "-3", "100001"):
        assert "--older-than-days must be from 1 to 100000" in fails(
            capsys, url, "usage", "prune", "--older-than-days", days)
    assert "--batch must be at least 1" in fails(
        capsys, url, "usage", "prune", "--older-than-days", "1", "--batch", "0")
    # without --older-than-days, the configured retention applies (here: keep everything)
    monkeypatch.setenv("TOLLWAY_USAGE_RETENTION_DAYS", "100000")
    code, out, _ = run(capsys, url, "usage", "--json", "prune")
    assert code == 0 and json.loads(out)["deleted"] == 0

    code, out, err = run(capsys, url, "usage", "--json", "prune", "--older-than-days", "1",
                         "--batch", "20")
    assert code == 0
    assert json.loads(out) == {"deleted": 51, "before": "2025-11-01T00:00:00Z",
                               "responses_forgotten": 0}
    assert err.splitlines() == [f"deleted {n} records…" for n in (20, 40, 51)]

    with books.db.read() as conn:
        left = conn.execute(sa.select(usage_records.c.request_id)
                            .order_by(usage_records.c.id)).scalars().all()
    assert left == kept
    assert _untouchable(books.db, books) == before
    assert ok(capsys, url, "ledger", "verify")["ok"] is True

    # again: nothing left to delete, no progress lines; the global options may come first
    code, out, err = run(capsys, url, "--json", "usage", "prune", "--older-than-days", "1")
    assert (code, err) == (0, "") and json.loads(out)["deleted"] == 0
    code, out, err = run(capsys, url, "usage", "prune", "--older-than-days", "1")
    assert (code, err) == (0, "")
    assert out.startswith("deleted 0 usage records older than 2025-11-01T00:00:00Z")
    # the log still pages over what is left
    body = ok(capsys, url, "usage", "alice", "--limit", "1000")
    assert [i["request_id"] for i in body["data"]] == [
        r for r in books.expect(LogFilter(account_id=books.accounts["alice"])) if r in kept]
