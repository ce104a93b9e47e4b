"""Promotional credit, on SQLite and PostgreSQL: grants are spent before paid money, the
soonest-expiring first; what expires leaves through the ledger, exactly, never taking money
held for a request in flight; settlement costs the same statements with or without grants;
the books verify after each step."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa

from fakes import ADMIN_TOKEN, USD, Tollway
from tollway.billing import grants
from tollway.billing.views import balance_view
from tollway.cli import main
from tollway.errors import InvalidRequest
from tollway.ledger import ledger
from tollway.ledger.verify import verify
from tollway.store import accounts as account_store
from tollway.store.db import Database

T = 1_900_000_000_000  # a fixed "now" (ms) for grant times
_spends = iter(range(10**6))


def new_account(db: Database, paid_usd: int) -> int:
    with db.write() as conn:
        account_id = account_store.create_account(conn, f"promo-{next(_spends)}", "default",
                                                  at_ms=T).id
        if paid_usd:
            ledger.topup(conn, account_id, paid_usd * USD, idempotency_key=f"paid-{account_id}",
                         at_ms=T)
    return account_id


def grant(db: Database, account_id: int, usd: int, expires_at_ms: int | None,
          reason: str = "welcome", at_ms: int = T) -> dict[str, Any]:
    with db.write() as conn:
        return grants.add(conn, account_id, usd * USD, reason=reason,
                          expires_at_ms=expires_at_ms, at_ms=at_ms,
                          idempotency_key=f"g-{account_id}-{usd}-{expires_at_ms}-{reason}")


def spend(db: Database, account_id: int, nano: int) -> None:
    key = f"spend-{next(_spends)}"
    with db.write() as conn:
        hold = ledger.place_hold(conn, account_id, nano, idempotency_key=key, ttl_ms=60_000,
                                 at_ms=T)
        ledger.settle_hold(conn, hold.id, nano, idempotency_key=key, at_ms=T)


def state(db: Database, account_id: int, at_ms: int = T) -> tuple[str, str, list[str]]:
    """(paid_usd, promotional_usd, remaining_usd of each grant, oldest first)."""
    with db.write() as conn:
        listed = grants.listing(conn, account_id, at_ms=at_ms)["data"]
        view = balance_view(account_store.get_account(conn, account_id))
    return view["paid_usd"], view["promotional_usd"], [g["remaining_usd"] for g in
                                                       reversed(listed)]


def books(db: Database) -> list[str]:
    with db.read() as conn:
        return verify(conn)


def test_grants_are_spent_first_soonest_expiry_first_and_expire_exactly(db: Database) -> None:
    account_id = new_account(db, paid_usd=10)
    grant(db, account_id, 5, T + 1000, "a")  # spent first
    grant(db, account_id, 3, T + 2000, "b")
    grant(db, account_id, 2, None, "c")  # never expires: spent last of the grants
    assert state(db, account_id) == ("10.000000000", "10.000000000",
                                     ["5.000000000", "3.000000000", "2.000000000"])
    spend(db, account_id, 6 * USD)  # all of a, 1 of b
    assert state(db, account_id) == ("10.000000000", "4.000000000",
                                     ["0.000000000", "2.000000000", "2.000000000"])
    with db.write() as conn:  # a's expiry: it has nothing left to take
        assert grants.expire_due(conn, at_ms=T + 1000) == 0
    with db.write() as conn:  # b's expiry, a millisecond early: nothing
        assert grants.expire_due(conn, at_ms=T + 1999) == 0
    with db.write() as conn:  # b's expiry: its 2.00 leaves
        assert grants.expire_due(conn, at_ms=T + 2000) == 2 * USD
    with db.write() as conn:  # and only once
        assert grants.expire_due(conn, at_ms=T + 5000) == 0
    assert state(db, account_id) == ("10.000000000", "2.000000000",
                                     ["0.000000000", "0.000000000", "2.000000000"])
    spend(db, account_id, 3 * USD)  # the last 2.00 of promotional credit, then 1.00 paid
    assert state(db, account_id) == ("9.000000000", "0.000000000",
                                     ["0.000000000", "0.000000000", "0.000000000"])
    with db.read() as conn:
        account = account_store.get_account(conn, account_id)
    assert (account.available_nano, account.promo_nano) == (9 * USD, 0)
    assert books(db) == []


def test_a_grant_added_later_does_not_take_earlier_spending(db: Database) -> None:
    account_id = new_account(db, paid_usd=0)
    grant(db, account_id, 5, T + 10_000, "late expiry")
    spend(db, account_id, 2 * USD)
    grant(db, account_id, 4, T + 1000, "early expiry", at_ms=T + 1)
    # the 2.00 spent came from the grant that existed; the new one starts whole
    assert state(db, account_id)[2] == ["3.000000000", "4.000000000"]
    spend(db, account_id, 1 * USD)  # now the earlier expiry goes first
    assert state(db, account_id)[2] == ["3.000000000", "3.000000000"]
    assert books(db) == []


def test_expiry_never_takes_money_held_for_a_request(db: Database) -> None:
    account_id = new_account(db, paid_usd=0)
    grant(db, account_id, 5, T + 1000)
    with db.write() as conn:
        hold = ledger.place_hold(conn, account_id, 4 * USD, idempotency_key="inflight",
                                 ttl_ms=60_000, at_ms=T)
    with db.write() as conn:  # 1.00 is available: that leaves; 4.00 is held
        assert grants.expire_due(conn, at_ms=T + 1000) == 1 * USD
    assert state(db, account_id, T + 1000)[2] == ["4.000000000"]
    with db.write() as conn:  # the request costs 2.50 of the held 4.00
        ledger.settle_hold(conn, hold.id, 2_500_000_000, idempotency_key="inflight", at_ms=T)
    with db.write() as conn:  # the released 1.50 was promotional and expired: it leaves too
        assert grants.expire_due(conn, at_ms=T + 2000) == 1_500_000_000
    with db.read() as conn:
        account = account_store.get_account(conn, account_id)
    assert (account.available_nano, account.held_nano, account.promo_nano) == (0, 0, 0)
    assert state(db, account_id, T + 2000)[2] == ["0.000000000"]
    assert books(db) == []


def test_a_grant_needs_a_reason_and_a_future_expiry(db: Database) -> None:
    account_id = new_account(db, paid_usd=0)
    with pytest.raises(InvalidRequest):
        grant(db, account_id, 1, None, reason=" ")
    with pytest.raises(InvalidRequest):
        grant(db, account_id, 1, T, reason="past")


def test_settlement_costs_the_same_statements_with_or_without_grants(
        db: Database, request: pytest.FixtureRequest) -> None:
    """The hot-path constraint: an account without grants pays no extra statement, and one
    with grants none either (spending burns them inside the settlement's own UPDATE)."""
    plain = new_account(db, paid_usd=10)
    promo = new_account(db, paid_usd=10)
    grant(db, promo, 5, T + 10_000)

    def statements(account_id: int) -> list[str]:
        seen: list[str] = []
        key = f"count-{account_id}"
        with db.write() as conn:
            hold = ledger.place_hold(conn, account_id, USD, idempotency_key=key, ttl_ms=60_000,
                                     at_ms=T)

            def count(*args: Any) -> None:
                seen.append(args[2])  # (conn, cursor, statement, ...)

            sa.event.listen(conn.engine, "before_cursor_execute", count)
            try:
                ledger.settle_hold(conn, hold.id, 2 * USD, idempotency_key=key, at_ms=T)
            finally:
                sa.event.remove(conn.engine, "before_cursor_execute", count)
        return seen

    assert len(statements(plain)) == len(statements(promo)) >= 5  # the settlement's own
    with db.read() as conn:
        assert account_store.get_account(conn, promo).promo_nano == 3 * USD
        assert account_store.get_account(conn, plain).promo_nano == 0
    assert books(db) == []


# ----------------------------------------------------------------------------- HTTP and CLI


def test_the_operator_grants_over_http_and_the_balance_shows_both_parts(tw: Tollway) -> None:
    account_id = tw.account(usd="10")
    key = tw.key(account_id)
    http = tw.http()
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Idempotency-Key": f"g{account_id}"}
    body = {"amount_usd": "2.50", "reason": "launch promo",
            "expires_at": "2099-01-01T00:00:00Z"}
    created = http.post(f"/admin/v1/accounts/{account_id}/grants", json=body, headers=admin)
    assert created.status_code == 201, created.text
    again = http.post(f"/admin/v1/accounts/{account_id}/grants", json=body, headers=admin)
    assert again.json()["entry_id"] == created.json()["entry_id"]  # one grant's money
    balance = http.get("/v1/billing/balance", headers={"Authorization": f"Bearer {key}"}).json()
    assert (balance["available_usd"], balance["paid_usd"], balance["promotional_usd"]) == (
        "12.500000000", "10.000000000", "2.500000000")
    listed = http.get(f"/admin/v1/accounts/{account_id}/grants", headers=admin).json()["data"]
    assert [(g["reason"], g["remaining_usd"], g["expires_at"]) for g in listed] == [
        ("launch promo", "2.500000000", "2099-01-01T00:00:00Z")]
    refused = http.post(f"/admin/v1/accounts/{account_id}/grants",
                        json={"amount_usd": "1"}, headers={"Authorization": admin[
                            "Authorization"]})
    assert refused.status_code == 400
    assert tw.verify() == []


def test_tollway_grants_add_and_list(capsys: pytest.CaptureFixture[str], db_url: str) -> None:
    assert main(["accounts", "create", "cli-promo", "--database-url", db_url]) == 0
    capsys.readouterr()
    assert main(["grants", "add", "cli-promo", "3.25", "--reason", "beta tester", "--expires",
                 "2099-06-01T00:00:00Z", "--json", "--database-url", db_url]) == 0
    added = json.loads(capsys.readouterr().out)
    assert (added["amount_usd"], added["available_usd"]) == ("3.250000000", "3.250000000")
    assert main(["grants", "list", "cli-promo", "--json", "--database-url", db_url]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["reason"], row["remaining_usd"]) == ("beta tester", "3.250000000")
    db = Database(db_url)
    with db.read() as conn:
        assert verify(conn) == []
        assert conn.execute(sa.text("SELECT promo_nano FROM accounts WHERE name='cli-promo'")
                            ).scalar_one() == 3_250_000_000
    db.dispose()
