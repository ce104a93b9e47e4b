"""Promotional credit in statements and from redemption codes, on SQLite and PostgreSQL.

A statement opens and closes with its balance split into paid and promotional parts, and
says what grants added, what spending took from them and what expired, each exact to the
nano-dollar (the CSV export and the CLI too). A redemption code grants promotional credit
named by the code's last four symbols only, valid for the days it was minted with, expiring
exactly then. The books verify after each step."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import USD
from tollway.billing import codes, grants
from tollway.billing.reports import month_bounds, statement_csv, statement_view
from tollway.billing.views import balance_view
from tollway.cli import main
from tollway.errors import InvalidRequest
from tollway.ledger import ledger
from tollway.ledger.verify import verify
from tollway.store import accounts as account_store
from tollway.store import reports as report_store
from tollway.store.db import Database

DAY = 86_400_000
JAN, FEB, MAR = (month_bounds(m)[0] for m in ("2030-01", "2030-02", "2030-03"))
_keys = iter(range(10**6))


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


def new_account(db: Database, *, at_ms: int = JAN) -> int:
    with db.write() as conn:
        return account_store.create_account(conn, f"promo-{next(_keys)}", "default",
                                            at_ms=at_ms).id


def topup(db: Database, account_id: int, nano: int, at_ms: int) -> None:
    with db.write() as conn:
        ledger.topup(conn, account_id, nano, idempotency_key=f"paid-{next(_keys)}",
                     at_ms=at_ms)


def grant(db: Database, account_id: int, nano: int, at_ms: int,
          expires_at_ms: int | None) -> None:
    with db.write() as conn:
        grants.add(conn, account_id, nano, reason="promo", expires_at_ms=expires_at_ms,
                   at_ms=at_ms, idempotency_key=f"g-{next(_keys)}")


def spend(db: Database, account_id: int, nano: int, at_ms: int) -> None:
    key = f"spend-{next(_keys)}"
    with db.write() as conn:
        hold = ledger.place_hold(conn, account_id, nano, idempotency_key=key, ttl_ms=60_000,
                                 at_ms=at_ms)
        ledger.settle_hold(conn, hold.id, nano, idempotency_key=key, at_ms=at_ms)


def statement(db: Database, account_id: int, month: str) -> dict[str, Any]:
    start, end = month_bounds(month)
    with db.read() as conn:
        account = account_store.get_account(conn, account_id)
        return statement_view(account, month, report_store.statement(
            conn, account_id, start_ms=start, end_ms=end))


def lines(view: dict[str, Any], *keys: str) -> tuple[str, ...]:
    return tuple(view[k] for k in keys)


def books(db: Database) -> list[str]:
    with db.read() as conn:
        return verify(conn)


BALANCES = ("opening_balance_usd", "opening_paid_usd", "opening_promotional_usd",
            "closing_balance_usd", "closing_paid_usd", "closing_promotional_usd")
MOVES = ("topups_usd", "adjustments_usd", "grants_added_usd", "charges_usd", "grants_spent_usd",
         "grants_expired_usd")


def test_statements_split_paid_and_promotional_exactly(db: Database) -> None:
    account_id = new_account(db)
    feb10 = ms("2030-02-10T00:00:00")
    topup(db, account_id, 10 * USD, ms("2030-01-02T10:00:00"))
    grant(db, account_id, 5 * USD, ms("2030-01-03T10:00:00"), feb10)  # grant A
    spend(db, account_id, 3 * USD, ms("2030-01-04T10:00:00"))  # all from A: A has 2 left
    assert books(db) == []
    jan = statement(db, account_id, "2030-01")
    assert lines(jan, *BALANCES) == ("0.000000000", "0.000000000", "0.000000000",
                                     "12.000000000", "10.000000000", "2.000000000")
    assert lines(jan, *MOVES) == ("10.000000000", "0.000000000", "5.000000000",
                                  "3.000000000", "3.000000000", "0.000000000")

    spend(db, account_id, 2_500_000_000, ms("2030-02-02T10:00:00"))  # A's 2, then 0.5 paid
    grant(db, account_id, 4 * USD, ms("2030-02-03T10:00:00"), feb10)  # grant B
    spend(db, account_id, 1_000_000_001, ms("2030-02-04T10:00:00"))  # from B
    with db.write() as conn:  # B's 2.999999999 expires exactly at its time
        assert grants.expire_due(conn, at_ms=feb10 - 1) == 0
    with db.write() as conn:
        assert grants.expire_due(conn, at_ms=feb10) == 2_999_999_999
    grant(db, account_id, 1 * USD, ms("2030-02-21T10:00:00"), None)  # grant C, for ever
    assert books(db) == []
    feb = statement(db, account_id, "2030-02")
    # 12 + 5 - 2.999999999 - 3.500000001 = 10.5, of which 1 promotional (C)
    assert lines(feb, *BALANCES) == ("12.000000000", "10.000000000", "2.000000000",
                                     "10.500000000", "9.500000000", "1.000000000")
    assert lines(feb, *MOVES) == ("0.000000000", "0.000000000", "5.000000000",
                                  "3.500000001", "3.000000001", "2.999999999")
    assert feb["promotional_reconciliation"] == (
        "2.000000000 + 5.000000000 − 3.000000001 − 2.999999999 = 1.000000000")
    assert feb["reconciliation"] == "12.000000000 + 5.000000000 − 6.500000000 = 10.500000000"
    mar = statement(db, account_id, "2030-03")  # a quiet month carries the split over
    assert lines(mar, *BALANCES) == ("10.500000000", "9.500000000", "1.000000000",
                                     "10.500000000", "9.500000000", "1.000000000")
    with db.read() as conn:  # the statement closes where the wallet stands
        view = balance_view(account_store.get_account(conn, account_id))
    assert (view["paid_usd"], view["promotional_usd"]) == ("9.500000000", "1.000000000")

    rows = {r["line"]: r["amount_usd"] for r in csv.DictReader(io.StringIO(
        statement_csv(feb))) if r["line"] != "charge"}
    assert rows == {
        "opening balance": "12.000000000", "opening paid": "10.000000000",
        "opening promotional": "2.000000000", "top-ups": "0.000000000",
        "adjustments": "0.000000000", "grants added": "5.000000000",
        "charges paid": "3.500000001", "grants spent": "3.000000001",
        "grants expired": "2.999999999", "written off": "0.000000000",
        "closing balance": "10.500000000", "closing paid": "9.500000000",
        "closing promotional": "1.000000000"}


def test_the_cli_statement_shows_the_promotional_lines(
        db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    db = Database(db_url)
    account_id = new_account(db)
    topup(db, account_id, 2 * USD, ms("2030-01-02T00:00:00"))
    grant(db, account_id, 1 * USD, ms("2030-01-02T00:00:01"), None)
    spend(db, account_id, 1_500_000_000, ms("2030-01-03T00:00:00"))
    capsys.readouterr()
    assert main(["--database-url", db_url, "statement", str(account_id), "--month",
                 "2030-01"]) == 0
    text = capsys.readouterr().out
    assert "grants spent" in text and "1.000000000 USD" in text
    assert "closing promotional" in text and "closing paid" in text
    assert ("promotional: 0.000000000 + 1.000000000 − 1.000000000 − 0.000000000 = "
            "0.000000000 USD") in text
    assert main(["--database-url", db_url, "--json", "statement", str(account_id),
                 "--month", "2030-01"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert lines(view, "closing_paid_usd", "closing_promotional_usd") == (
        "1.500000000", "0.000000000")
    assert main(["--database-url", db_url, "ledger", "verify"]) == 0
    db.dispose()


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["topup", "grant", "spend", "expire"]),
                          st.integers(1, 3 * USD), st.integers(0, 30)), max_size=14))
def test_every_month_reconciles_and_the_last_closes_at_the_wallet(
        db: Database, moves: list[tuple[str, int, int]]) -> None:
    """Any mix of top-ups, grants (expiring within days or never), spending and expiry
    sweeps, over three months: each month's promotional part opens where the last closed,
    moves by exactly its grants, spending and expiries, never exceeds the balance or spends
    more than was charged; the last month closes at the wallet's own split."""
    account_id = new_account(db)
    at = JAN
    for kind, nano, days in moves:
        at += days * DAY // 4 + 1
        if kind == "topup":
            topup(db, account_id, nano, at)
        elif kind == "grant":
            grant(db, account_id, nano, at, None if days % 3 == 0 else at + days * DAY)
        elif kind == "spend":
            with db.read() as conn:
                available = account_store.get_account(conn, account_id).available_nano
            if available:
                spend(db, account_id, min(nano, available), at)
        else:
            with db.write() as conn:
                grants.expire_due(conn, at_ms=at)
    assert books(db) == []
    previous = 0
    for month in ("2030-01", "2030-02", "2030-03", "2030-04", "2030-05"):
        view = {k: int(v.replace(".", "")) for k, v in statement(
            db, account_id, month).items() if k.endswith("_usd")}
        assert view["opening_promotional_usd"] == previous
        assert (view["opening_promotional_usd"] + view["grants_added_usd"]
                - view["grants_spent_usd"] - view["grants_expired_usd"]
                == view["closing_promotional_usd"])
        assert 0 <= view["grants_spent_usd"] <= view["charges_usd"]
        assert 0 <= view["closing_promotional_usd"] <= view["closing_balance_usd"]
        assert view["closing_paid_usd"] + view["closing_promotional_usd"] == view[
            "closing_balance_usd"]
        previous = view["closing_promotional_usd"]
    with db.read() as conn:
        account = account_store.get_account(conn, account_id)
    assert previous == min(account.promo_nano, account.available_nano + account.held_nano)


# --------------------------------------------------------------------------- codes


def test_a_codes_credit_is_a_grant_valid_for_its_days(db: Database) -> None:
    account_id, other = new_account(db), new_account(db)
    now = ms("2030-01-05T12:00:00")
    with db.write() as conn:
        [new] = codes.mint(conn, 2 * USD, at_ms=now, credit_days=7, note="spring")
        [plain] = codes.mint(conn, USD, at_ms=now)
    redeemed_at = now + 1000
    with db.write() as conn:
        won = codes.redeem(conn, account_id, new.code, redeemed_at)
        codes.redeem(conn, other, plain.code, redeemed_at)
    expires = redeemed_at + 7 * DAY
    assert (won.amount_nano, won.available_nano, won.credit_expires_at_ms) == (
        2 * USD, 2 * USD, expires)
    assert codes.redemption_view(won)["credit_expires_at"] == "2030-01-12T12:00:01Z"
    with db.write() as conn:
        [listed] = grants.listing(conn, account_id, at_ms=redeemed_at)["data"]
        [forever] = grants.listing(conn, other, at_ms=redeemed_at)["data"]
    assert listed["reason"] == f"redemption code …{new.code[-4:]}"
    assert new.code[3:-5] not in json.dumps(listed)  # only the last four symbols
    assert (listed["amount_usd"], listed["expires_at"]) == ("2.000000000",
                                                            "2030-01-12T12:00:01Z")
    assert forever["expires_at"] is None
    spend(db, account_id, 500_000_001, now + 2000)
    with db.write() as conn:
        assert grants.expire_due(conn, at_ms=expires - 1) == 0
    with db.write() as conn:
        assert grants.expire_due(conn, at_ms=expires) == 1_499_999_999
    with db.read() as conn:
        view = balance_view(account_store.get_account(conn, account_id))
    assert (view["available_usd"], view["promotional_usd"]) == ("0.000000000", "0.000000000")
    jan = statement(db, account_id, "2030-01")
    assert lines(jan, "grants_added_usd", "grants_spent_usd", "grants_expired_usd",
                 "topups_usd") == ("2.000000000", "0.500000001", "1.499999999", "0.000000000")
    assert books(db) == []


def test_minting_with_a_credit_validity(db_url: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    db = Database(db_url)
    with db.write() as conn:
        for bad in (0, -1, codes.MAX_CREDIT_DAYS + 1, True):
            with pytest.raises(InvalidRequest, match="whole number of days"):
                codes.mint(conn, USD, at_ms=JAN, credit_days=bad)
    capsys.readouterr()
    assert main(["--database-url", db_url, "codes", "create", "--amount", "3",
                 "--count", "2", "--credit-expires-days", "30"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["amount_usd"], r["credit_expires_days"]) for r in rows] == [
        ("3.000000000", "30")] * 2
    assert main(["--database-url", db_url, "codes", "create", "--amount", "3",
                 "--credit-expires-days", "0"]) == 1
    assert "whole number of days" in capsys.readouterr().err
    account_id = new_account(db)
    assert main(["--database-url", db_url, "--json", "codes", "redeem", str(account_id),
                 rows[0]["code"]]) == 0
    redeemed = json.loads(capsys.readouterr().out)
    assert redeemed["promotional"] is True and redeemed["credit_expires_at"] is not None
    assert main(["--database-url", db_url, "--json", "codes", "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {c["credit_expires_days"] for c in listed} == {30}
    assert main(["--database-url", db_url, "ledger", "verify"]) == 0
    db.dispose()
