"""The ledger as a user relies on it: top-ups, holds, settlement, voids, expiry, key quotas,
adjustments, ``verify`` and the batching writer. Every test runs on SQLite and PostgreSQL.

Money is integer nano-USD (1 USD = 1_000_000_000); every expected amount below is written out
by hand, never computed by the code under test.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa

from tollway import clock
from tollway.errors import (
    HoldClosed,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidRequest,
    QuotaExceeded,
    UnknownAccount,
    UnknownHold,
)
from tollway.ledger import grants, ledger
from tollway.ledger.guards import RateAdmission, RateCorrection
from tollway.ledger.ledger import ONE_STATEMENT, Adjustment, Hold, Release, Settlement, Topup
from tollway.ledger.verify import verify
from tollway.store.accounts import create_account, get_account, get_key, insert_key
from tollway.store.db import Database
from tollway.store.tables import accounts, api_keys, entries, holds, postings, wallet_days
from tollway.store.writer import Writer

USD = 1_000_000_000
FUNDING, REVENUE, WRITEOFF, ADJUSTMENTS = 1, 2, 3, 4
HOUR_MS = 3_600_000


# --------------------------------------------------------------------------- helpers


def new_account(db: Database, name: str = "alice", topup_nano: int = 0) -> int:
    with db.write() as conn:
        account_id = create_account(conn, name, "default", at_ms=0).id
        if topup_nano:
            ledger.topup(conn, account_id, topup_nano, idempotency_key=f"seed-{name}",
                         at_ms=clock.now_ms())
    return account_id


def balances(db: Database, account_id: int) -> tuple[int, int]:
    """(available_nano, held_nano) as stored on the wallet row."""
    with db.read() as conn:
        account = get_account(conn, account_id)
    return account.available_nano, account.held_nano


def rows(db: Database, table: sa.Table) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def posted(db: Database, account_id: int, bucket: str = "available") -> int:
    """The sum of one ledger account's postings."""
    with db.read() as conn:
        return int(conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(postings.c.amount_nano), 0))
            .where(postings.c.account_id == account_id, postings.c.bucket == bucket)
        ).scalar_one())


def snapshot(db: Database) -> dict[str, Any]:
    """Everything a failed operation must leave untouched."""
    with db.read() as conn:
        return {
            "accounts": sorted(tuple(r) for r in conn.execute(sa.select(accounts))),
            "api_keys": sorted(tuple(r) for r in conn.execute(sa.select(api_keys))),
            "holds": sorted(tuple(r) for r in conn.execute(sa.select(holds))),
            "entries": sorted(tuple(r) for r in conn.execute(sa.select(entries))),
            "postings": sorted(tuple(r) for r in conn.execute(sa.select(postings))),
        }


def assert_verified(db: Database) -> None:
    with db.read() as conn:
        assert verify(conn) == []


def hold_row(db: Database, hold_id: int) -> Any:
    with db.read() as conn:
        return conn.execute(sa.select(holds).where(holds.c.id == hold_id)).one()


# --------------------------------------------------------------------------- top-ups


def test_topup_credits_wallet_and_returns_new_balance(db: Database) -> None:
    alice = new_account(db)
    with db.write() as conn:
        first = ledger.topup(conn, alice, 5 * USD, idempotency_key="t1", note="first",
                             at_ms=clock.now_ms())
    assert (first.account_id, first.amount_nano, first.balance_nano) == (alice, 5_000_000_000,
                                                                          5_000_000_000)
    with db.write() as conn:
        second = ledger.topup(conn, alice, 2_500_000_001, idempotency_key="t2",
                              at_ms=clock.now_ms())
    assert second.balance_nano == 7_500_000_001
    assert second.entry_id != first.entry_id
    assert balances(db, alice) == (7_500_000_001, 0)
    assert posted(db, alice) == 7_500_000_001
    assert posted(db, FUNDING) == -7_500_000_001
    assert (rows(db, entries), rows(db, postings)) == (2, 4)
    assert_verified(db)


def test_topup_repeat_with_same_key_returns_first_result_and_moves_money_once(
        db: Database) -> None:
    alice = new_account(db)
    with db.write() as conn:
        first = ledger.topup(conn, alice, 3 * USD, idempotency_key="pay-1", at_ms=clock.now_ms())
    with db.write() as conn:  # another top-up in between: the repeat must not report it
        ledger.topup(conn, alice, 1 * USD, idempotency_key="pay-2", at_ms=clock.now_ms())
    with db.write() as conn:
        again = ledger.topup(conn, alice, 3 * USD, idempotency_key="pay-1", at_ms=clock.now_ms())
    assert again == first == Topup(first.entry_id, alice, 3_000_000_000, 3_000_000_000)
    assert balances(db, alice) == (4_000_000_000, 0)
    assert (rows(db, entries), rows(db, postings)) == (2, 4)
    assert_verified(db)


def test_topup_same_key_with_other_parameters_is_a_conflict_and_writes_nothing(
        db: Database) -> None:
    alice = new_account(db)
    bob = new_account(db, "bob")
    with db.write() as conn:
        ledger.topup(conn, alice, 3 * USD, idempotency_key="pay-1", at_ms=clock.now_ms())
    before = snapshot(db)
    with pytest.raises(IdempotencyConflict) as err, db.write() as conn:
        ledger.topup(conn, alice, 4 * USD, idempotency_key="pay-1", at_ms=clock.now_ms())
    assert err.value.status == 409
    with pytest.raises(IdempotencyConflict), db.write() as conn:  # same amount, other wallet
        ledger.topup(conn, bob, 3 * USD, idempotency_key="pay-1", at_ms=clock.now_ms())
    assert snapshot(db) == before
    assert balances(db, alice) == (3_000_000_000, 0)
    assert balances(db, bob) == (0, 0)
    assert_verified(db)


BAD_AMOUNTS: list[Any] = [0, -1, -5 * USD, 1.5, 1e9, "1000000000", Decimal(1), True, None]


def test_topup_rejects_amounts_that_are_not_positive_integers(db: Database) -> None:
    alice = new_account(db)
    before = snapshot(db)
    for amount in BAD_AMOUNTS:
        with pytest.raises(InvalidRequest), db.write() as conn:
            ledger.topup(conn, alice, amount, idempotency_key="bad", at_ms=clock.now_ms())
    assert snapshot(db) == before
    assert rows(db, entries) == 0
    assert_verified(db)


def test_topup_of_unknown_or_system_account_is_refused(db: Database) -> None:
    new_account(db)
    before = snapshot(db)
    for account_id in (999_999, FUNDING, REVENUE, WRITEOFF, ADJUSTMENTS):
        with pytest.raises(UnknownAccount), db.write() as conn:
            ledger.topup(conn, account_id, 1 * USD, idempotency_key=f"t{account_id}",
                         at_ms=clock.now_ms())
    assert snapshot(db) == before
    assert (rows(db, entries), rows(db, postings)) == (0, 0)
    assert_verified(db)


# --------------------------------------------------------------------------- holds


def test_place_hold_moves_available_to_held(db: Database) -> None:
    alice = new_account(db, topup_nano=10 * USD)
    entries_before = rows(db, entries)
    with db.write() as conn:
        hold = ledger.place_hold(conn, alice, 2_750_000_000, idempotency_key="h1",
                                 ttl_ms=HOUR_MS, at_ms=clock.now_ms())
    assert (hold.account_id, hold.amount_nano, hold.status, hold.key_id) == (
        alice, 2_750_000_000, "open", None)
    assert balances(db, alice) == (7_250_000_000, 2_750_000_000)
    # a reservation, not a movement: nothing is booked in the ledger until the settlement
    assert rows(db, entries) == entries_before
    assert posted(db, alice, "available") == 10 * USD
    assert posted(db, alice, "held") == 0
    assert hold_row(db, hold.id).idempotency_key == "h1"
    row = hold_row(db, hold.id)
    assert row.expires_at_ms - row.created_at_ms == HOUR_MS
    assert row.expires_at_ms == hold.expires_at_ms
    # a second hold may take exactly what is left
    with db.write() as conn:
        ledger.place_hold(conn, alice, 7_250_000_000, idempotency_key="h2", ttl_ms=HOUR_MS,
                          at_ms=clock.now_ms())
    assert balances(db, alice) == (0, 10_000_000_000)
    # repeating a hold returns it and reserves nothing more
    with db.write() as conn:
        assert ledger.place_hold(conn, alice, 2_750_000_000, idempotency_key="h1",
                                 ttl_ms=HOUR_MS, at_ms=clock.now_ms()) == hold
    assert balances(db, alice) == (0, 10_000_000_000)
    assert rows(db, holds) == 2
    with pytest.raises(IdempotencyConflict), db.write() as conn:
        ledger.place_hold(conn, alice, 1, idempotency_key="h1", ttl_ms=HOUR_MS,
                          at_ms=clock.now_ms())
    assert_verified(db)


def test_place_hold_beyond_available_is_refused_and_writes_nothing(db: Database) -> None:
    alice = new_account(db, topup_nano=1 * USD)
    before = snapshot(db)
    with pytest.raises(InsufficientBalance) as err, db.write() as conn:
        ledger.place_hold(conn, alice, 1_000_000_001, idempotency_key="h", ttl_ms=HOUR_MS,
                          at_ms=clock.now_ms())
    assert err.value.status == 402
    assert "1.000000000 USD available" in err.value.message
    assert snapshot(db) == before
    assert balances(db, alice) == (1_000_000_000, 0)
    assert rows(db, holds) == 0
    assert rows(db, entries) == 1  # the seed top-up only
    # the refused key is free: the same key succeeds once the request fits
    with db.write() as conn:
        ledger.place_hold(conn, alice, 1_000_000_000, idempotency_key="h", ttl_ms=HOUR_MS,
                          at_ms=clock.now_ms())
    assert balances(db, alice) == (0, 1_000_000_000)
    assert_verified(db)


def test_place_hold_refuses_bad_amounts_and_unknown_accounts(db: Database) -> None:
    alice = new_account(db, topup_nano=1 * USD)
    before = snapshot(db)
    for amount in BAD_AMOUNTS:
        with pytest.raises(InvalidRequest), db.write() as conn:
            ledger.place_hold(conn, alice, amount, idempotency_key="h", ttl_ms=HOUR_MS,
                              at_ms=clock.now_ms())
    for account_id in (999_999, REVENUE):
        with pytest.raises(UnknownAccount), db.write() as conn:
            ledger.place_hold(conn, account_id, 1, idempotency_key="h", ttl_ms=HOUR_MS,
                              at_ms=clock.now_ms())
    assert snapshot(db) == before


# --------------------------------------------------------------------------- settlement

# balance 10 USD, one hold of 4 USD, then settle with `actual`: the settlement's one entry
# has the charge's postings only (the hold itself was never booked)
# (actual, charged, from_hold, from_available, shortfall, released, available after, postings)
SETTLE_CASES = {
    "under": (1_250_000_000, 1_250_000_000, 1_250_000_000, 0, 0, 2_750_000_000,
              8_750_000_000, 2),  # wallet -1.25, revenue +1.25
    "exact": (4_000_000_000, 4_000_000_000, 4_000_000_000, 0, 0, 0,
              6_000_000_000, 2),  # wallet -4, revenue +4
    "over": (5_500_000_000, 5_500_000_000, 4_000_000_000, 1_500_000_000, 0, 0,
             4_500_000_000, 2),  # wallet -5.5, revenue +5.5
    "zero": (0, 0, 0, 0, 0, 4_000_000_000,
             10_000_000_000, 0),  # nothing moves: an entry with no postings
    "shortfall": (12_300_000_000, 12_300_000_000, 4_000_000_000, 6_000_000_000, 2_300_000_000,
                  0, 0, 3),  # wallet -10, revenue +12.3, write-off -2.3
    "all_of_it": (10_000_000_000, 10_000_000_000, 4_000_000_000, 6_000_000_000, 0, 0, 0, 2),
}


def test_settle(db: Database) -> None:
    """Each case on its own wallet (10 USD, one 4 USD hold), in one database."""
    for case in SETTLE_CASES:
        check_settle_case(db, case)
    # all six charges are revenue: 1.25 + 4 + 5.5 + 0 + 12.3 + 10 = 33.05 USD
    assert posted(db, REVENUE) == 33_050_000_000
    assert posted(db, WRITEOFF) == -2_300_000_000
    assert posted(db, FUNDING) == -60_000_000_000
    assert_verified(db)


def check_settle_case(db: Database, case: str) -> None:
    actual, charged, from_hold, from_avail, shortfall, released, available, n_postings = (
        SETTLE_CASES[case])
    alice = new_account(db, case, topup_nano=10 * USD)
    with db.write() as conn:
        hold = ledger.place_hold(conn, alice, 4 * USD, idempotency_key=f"{case}-h",
                                 ttl_ms=HOUR_MS, at_ms=clock.now_ms())
    assert balances(db, alice) == (6_000_000_000, 4_000_000_000)
    postings_before, entries_before = rows(db, postings), rows(db, entries)
    revenue_before, writeoff_before = posted(db, REVENUE), posted(db, WRITEOFF)

    with db.write() as conn:
        settlement = ledger.settle_hold(conn, hold.id, actual, idempotency_key=f"{case}-s",
                                        at_ms=clock.now_ms())
    assert settlement == Settlement(hold.id, charged, from_hold, from_avail, shortfall, released)
    assert balances(db, alice) == (available, 0)
    assert rows(db, postings) - postings_before == n_postings
    assert rows(db, entries) - entries_before == 1
    assert posted(db, REVENUE) - revenue_before == charged
    assert posted(db, WRITEOFF) - writeoff_before == -shortfall
    # the wallet's postings: 10 USD in, `charged - shortfall` out, nothing ever held
    assert posted(db, alice, "available") == 10 * USD - (charged - shortfall) == available
    assert posted(db, alice, "held") == 0
    account = get_account_row(db, alice)
    assert (account.used_nano, account.requests) == (charged, 1)
    row = hold_row(db, hold.id)
    assert (row.status, row.charged_nano, row.from_available_nano, row.shortfall_nano) == (
        "settled", charged, from_avail, shortfall)

    # a retry with the same key returns the same settlement and moves nothing
    before = snapshot(db)
    with db.write() as conn:
        assert ledger.settle_hold(conn, hold.id, actual,
                                  idempotency_key=f"{case}-s", at_ms=clock.now_ms()) == settlement
    assert snapshot(db) == before
    # the same key with another amount is a conflict; another key finds the hold closed
    with pytest.raises(IdempotencyConflict), db.write() as conn:
        ledger.settle_hold(conn, hold.id, actual + 1, idempotency_key=f"{case}-s",
                           at_ms=clock.now_ms())
    with pytest.raises(HoldClosed) as err, db.write() as conn:
        ledger.settle_hold(conn, hold.id, actual, idempotency_key=f"{case}-s-other",
                           at_ms=clock.now_ms())
    assert "settled" in err.value.message
    with pytest.raises(HoldClosed), db.write() as conn:
        ledger.void_hold(conn, hold.id, at_ms=clock.now_ms())
    assert snapshot(db) == before
    assert_verified(db)


def get_account_row(db: Database, account_id: int) -> Any:
    with db.read() as conn:
        return get_account(conn, account_id)


def test_a_hold_and_its_settlement_book_the_same_whichever_path_they_take(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL a hold and a settlement its hold covers are one statement each
    (``ledger.ONE_STATEMENT``); they must leave every row as the statement-by-statement path
    does: the hold, the wallet (its promotional part too), the key (its window, with the
    settlement's correction), the wallet's day, the entry and its postings. Each case runs
    twice, on twin wallets and keys: the second time with the one-statement path switched
    off. (On SQLite both runs take the long path.)"""
    at = 1_800_000_000_000  # one fixed instant: both runs book in the same day and window
    cases = {  # name: (promotional credit, hold, charge)
        "part": (0, 4 * USD, 1_250_000_000),
        "all": (0, 4 * USD, 4 * USD),
        "zero": (0, 4 * USD, 0),
        "promo-left": (3 * USD, 4 * USD, 1 * USD),
        "promo-used-up": (1 * USD, 4 * USD, 2_500_000_000),
    }

    def run(case: str, promo: int, hold_nano: int, charge: int, *, long: bool
            ) -> dict[str, Any]:
        monkeypatch.setattr(ledger, "ONE_STATEMENT", frozenset() if long else ONE_STATEMENT)
        alice = new_account(db, case, topup_nano=10 * USD)
        with db.write() as conn:
            if promo:
                grants.grant(conn, alice, promo, idempotency_key=f"{case}-g", at_ms=at)
            key = insert_key(conn, account_id=alice, prefix=f"tw-{case}", key_hash=case,
                             name=None, group=None, models=None, quota_nano=20 * USD,
                             expires_at_ms=None, at_ms=0)
            hold = ledger.place_hold(conn, alice, hold_nano, idempotency_key=f"{case}-h",
                                     ttl_ms=HOUR_MS, at_ms=at, key_id=key.id,
                                     rate=RateAdmission(window_start_ms=at, tokens=30))
        with db.write() as conn:
            settlement = ledger.settle_hold(
                conn, hold.id, charge, idempotency_key=f"{case}-s", at_ms=at + 5,
                correction=RateCorrection(window_start_ms=at, tokens=12))
        with db.read() as conn:
            def one(table: sa.Table, *where: Any, skip: tuple[str, ...] = ()) -> Any:
                found = conn.execute(sa.select(table).where(*where)).mappings().all()
                return [{k: v for k, v in r.items() if k not in ("id", *skip)}
                        for r in found]
            entry = one(entries, entries.c.hold_id == hold.id,
                        skip=("account_id", "hold_id", "idempotency_key"))
            entry_id = conn.execute(sa.select(entries.c.id)
                                    .where(entries.c.hold_id == hold.id)).scalar_one()
            return {
                "placed": (hold.amount_nano, hold.expires_at_ms, hold.status, hold.window),
                "settlement": (settlement.charged_nano, settlement.from_hold_nano,
                               settlement.from_available_nano, settlement.shortfall_nano,
                               settlement.released_nano),
                "hold": one(holds, holds.c.id == hold.id,
                            skip=("account_id", "key_id", "idempotency_key")),
                "wallet": one(accounts, accounts.c.id == alice,
                              skip=("name", "created_at_ms")),
                "key": one(api_keys, api_keys.c.id == key.id,
                           skip=("account_id", "prefix", "key_hash")),
                "day": one(wallet_days, wallet_days.c.account_id == alice,
                           skip=("account_id",)),
                "entry": entry,
                "postings": sorted(  # the wallet by name: the twins' ids differ
                    ("wallet" if account == alice else str(account), bucket, amount)
                    for account, bucket, amount in conn.execute(
                        sa.select(postings.c.account_id, postings.c.bucket,
                                  postings.c.amount_nano)
                        .where(postings.c.entry_id == entry_id))),
            }

    for case, (promo, hold_nano, charge) in cases.items():
        one_statement = run(case, promo, hold_nano, charge, long=False)
        statement_by_statement = run(f"{case}-long", promo, hold_nano, charge, long=True)
        assert one_statement == statement_by_statement, case
    assert_verified(db)


def test_shortfall_never_takes_a_balance_below_zero_across_several_holds(db: Database) -> None:
    """Two open holds; the first overruns by more than the free balance: the second hold stays
    untouched (only `available` pays), the wallet hits exactly zero and the rest is written
    off."""
    alice = new_account(db, topup_nano=3 * USD)
    with db.write() as conn:
        h1 = ledger.place_hold(conn, alice, 1 * USD, idempotency_key="h1", ttl_ms=HOUR_MS,
                               at_ms=clock.now_ms())
        h2 = ledger.place_hold(conn, alice, 1 * USD, idempotency_key="h2", ttl_ms=HOUR_MS,
                               at_ms=clock.now_ms())
    assert balances(db, alice) == (1_000_000_000, 2_000_000_000)
    with db.write() as conn:
        s1 = ledger.settle_hold(conn, h1.id, 5 * USD, idempotency_key="s1", at_ms=clock.now_ms())
    # 1 from its hold, 1 from available, 3 written off; h2's 1 USD stays held
    assert s1 == Settlement(h1.id, 5_000_000_000, 1_000_000_000, 1_000_000_000, 3_000_000_000, 0)
    assert balances(db, alice) == (0, 1_000_000_000)
    with db.write() as conn:
        s2 = ledger.settle_hold(conn, h2.id, 1_500_000_000, idempotency_key="s2",
                                at_ms=clock.now_ms())
    assert s2 == Settlement(h2.id, 1_500_000_000, 1_000_000_000, 0, 500_000_000, 0)
    assert balances(db, alice) == (0, 0)
    assert posted(db, REVENUE) == 6_500_000_000
    assert posted(db, WRITEOFF) == -3_500_000_000
    assert posted(db, FUNDING) == -3_000_000_000
    assert_verified(db)


def test_settle_of_voided_or_unknown_hold(db: Database) -> None:
    alice = new_account(db, topup_nano=2 * USD)
    with db.write() as conn:
        hold = ledger.place_hold(conn, alice, 1 * USD, idempotency_key="h", ttl_ms=HOUR_MS,
                                 at_ms=clock.now_ms())
        ledger.void_hold(conn, hold.id, at_ms=clock.now_ms())
    before = snapshot(db)
    with pytest.raises(HoldClosed) as err, db.write() as conn:
        ledger.settle_hold(conn, hold.id, 1, idempotency_key="s", at_ms=clock.now_ms())
    assert "voided" in err.value.message
    with pytest.raises(UnknownHold), db.write() as conn:
        ledger.settle_hold(conn, 424_242, 1, idempotency_key="s", at_ms=clock.now_ms())
    with pytest.raises(InvalidRequest), db.write() as conn:
        ledger.settle_hold(conn, hold.id, -1, idempotency_key="s", at_ms=clock.now_ms())
    assert snapshot(db) == before
    assert balances(db, alice) == (2_000_000_000, 0)
    assert posted(db, REVENUE) == 0
    assert_verified(db)


# --------------------------------------------------------------------------- voids


def test_void_returns_everything_and_repeat_is_idempotent(db: Database) -> None:
    alice = new_account(db, topup_nano=5 * USD)
    with db.write() as conn:
        hold = ledger.place_hold(conn, alice, 3_333_333_333, idempotency_key="h",
                                 ttl_ms=HOUR_MS, at_ms=clock.now_ms())
    assert balances(db, alice) == (1_666_666_667, 3_333_333_333)
    with db.write() as conn:
        release = ledger.void_hold(conn, hold.id, at_ms=clock.now_ms())
    assert release == Release(hold.id, 3_333_333_333, "voided")
    assert balances(db, alice) == (5_000_000_000, 0)
    assert posted(db, REVENUE) == 0
    account = get_account_row(db, alice)
    assert (account.used_nano, account.requests) == (0, 0)
    assert hold_row(db, hold.id).status == "voided"

    before = snapshot(db)
    with db.write() as conn:
        assert ledger.void_hold(conn, hold.id, at_ms=clock.now_ms()) == release
    assert snapshot(db) == before
    # a void books nothing: the hold is its own key, so voiding it again is a repeat too
    assert rows(db, entries) == 1  # the seed top-up only
    with pytest.raises(UnknownHold), db.write() as conn:
        ledger.void_hold(conn, 424_242, at_ms=clock.now_ms())
    assert snapshot(db) == before
    assert_verified(db)


# --------------------------------------------------------------------------- key quotas


def test_key_quota_refuses_holds_beyond_it_and_writes_nothing(db: Database) -> None:
    alice = new_account(db, topup_nano=100 * USD)
    with db.write() as conn:
        key = insert_key(conn, account_id=alice, prefix="tw-x", key_hash="h1", name=None,
                         group=None, models=None, quota_nano=10 * USD, expires_at_ms=None,
                         at_ms=0)

    def hold(amount: int, idem: str) -> Hold:
        with db.write() as conn:
            return ledger.place_hold(conn, alice, amount, idempotency_key=idem, ttl_ms=HOUR_MS,
                                     key_id=key.id, at_ms=clock.now_ms())

    h1 = hold(6 * USD, "k1")  # used 0 + held 0 + 6 <= 10
    before = snapshot(db)
    with pytest.raises(QuotaExceeded) as err:
        hold(5 * USD, "k2")  # 0 + 6 + 5 = 11 > 10
    assert err.value.status == 429
    assert snapshot(db) == before  # the wallet reservation was rolled back with the rest
    assert balances(db, alice) == (94_000_000_000, 6_000_000_000)

    h2 = hold(4 * USD, "k3")  # 0 + 6 + 4 = 10: exactly the quota
    with db.write() as conn:
        ledger.settle_hold(conn, h1.id, 3 * USD, idempotency_key="s1",
                           at_ms=clock.now_ms())  # used 3, held 4
        record = get_key(conn, key.id)
    assert (record.used_nano, record.held_nano) == (3_000_000_000, 4_000_000_000)
    h3 = hold(3 * USD, "k4")  # 3 + 4 + 3 = 10
    before = snapshot(db)
    with pytest.raises(QuotaExceeded):
        hold(1, "k5")  # 3 + 7 + 1 nano > 10
    assert snapshot(db) == before
    # the account itself is not limited by another key's quota: a hold without a key passes
    with db.write() as conn:
        ledger.place_hold(conn, alice, 50 * USD, idempotency_key="nokey", ttl_ms=HOUR_MS,
                          at_ms=clock.now_ms())
    # voiding gives quota back
    with db.write() as conn:
        ledger.void_hold(conn, h2.id, at_ms=clock.now_ms())
        ledger.void_hold(conn, h3.id, at_ms=clock.now_ms())
        record = get_key(conn, key.id)
    assert (record.used_nano, record.held_nano) == (3_000_000_000, 0)
    hold(7 * USD, "k6")  # 3 + 0 + 7 = 10
    # wallet: 100 - 3 charged = 97, of which 50 + 7 held
    assert balances(db, alice) == (40_000_000_000, 57_000_000_000)
    assert_verified(db)


# --------------------------------------------------------------------------- adjustments


def test_adjust_positive_and_negative(db: Database) -> None:
    alice = new_account(db, topup_nano=2 * USD)
    with db.write() as conn:
        up = ledger.adjust(conn, alice, 500_000_000, idempotency_key="a1", note="goodwill",
                           at_ms=clock.now_ms())
    assert up == Adjustment(up.entry_id, alice, 500_000_000, 2_500_000_000)
    with db.write() as conn:
        down = ledger.adjust(conn, alice, -2_400_000_000, idempotency_key="a2",
                             at_ms=clock.now_ms())
    assert down.balance_nano == 100_000_000
    assert balances(db, alice) == (100_000_000, 0)
    assert posted(db, ADJUSTMENTS) == 1_900_000_000  # -0.5 + 2.4
    with db.write() as conn:  # repeat: same result, no movement
        assert ledger.adjust(conn, alice, -2_400_000_000, idempotency_key="a2",
                             at_ms=clock.now_ms()) == down
    assert balances(db, alice) == (100_000_000, 0)

    with db.write() as conn:
        ledger.place_hold(conn, alice, 60_000_000, idempotency_key="h", ttl_ms=HOUR_MS,
                          at_ms=clock.now_ms())
    before = snapshot(db)
    # 0.04 USD available (0.06 is held): a debit of 0.04 + 1 nano is refused
    with pytest.raises(InsufficientBalance), db.write() as conn:
        ledger.adjust(conn, alice, -40_000_001, idempotency_key="a3", at_ms=clock.now_ms())
    with pytest.raises(IdempotencyConflict), db.write() as conn:
        ledger.adjust(conn, alice, 2_400_000_000, idempotency_key="a2", at_ms=clock.now_ms())
    with pytest.raises(InvalidRequest), db.write() as conn:
        ledger.adjust(conn, alice, 0, idempotency_key="a4", at_ms=clock.now_ms())
    with pytest.raises(UnknownAccount), db.write() as conn:
        ledger.adjust(conn, 999_999, -1, idempotency_key="a5", at_ms=clock.now_ms())
    with pytest.raises(UnknownAccount), db.write() as conn:
        ledger.adjust(conn, WRITEOFF, 1, idempotency_key="a6", at_ms=clock.now_ms())
    assert snapshot(db) == before
    with db.write() as conn:
        ledger.adjust(conn, alice, -40_000_000, idempotency_key="a3", at_ms=clock.now_ms())
    assert balances(db, alice) == (0, 60_000_000)
    assert_verified(db)


# --------------------------------------------------------------------------- crash recovery


def test_crash_between_hold_and_settle_is_repaired_by_the_reaper(db: Database) -> None:
    alice = new_account(db, topup_nano=1 * USD)
    with db.write() as conn:
        doomed = ledger.place_hold(conn, alice, 300_000_000, idempotency_key="req-1", ttl_ms=0,
                                   at_ms=clock.now_ms())
        alive = ledger.place_hold(conn, alice, 200_000_000, idempotency_key="req-2",
                                  ttl_ms=HOUR_MS, at_ms=clock.now_ms())
    # ... the process that placed `doomed` dies here; later a reaper runs in a new transaction
    assert balances(db, alice) == (500_000_000, 500_000_000)
    with db.write() as conn:
        assert ledger.expire_holds(conn, now=doomed.expires_at_ms - 1) == []
    with db.write() as conn:
        released = ledger.expire_holds(conn, now=doomed.expires_at_ms)
    assert released == [Release(doomed.id, 300_000_000, "expired")]
    assert hold_row(db, doomed.id).status == "expired"
    assert balances(db, alice) == (800_000_000, 200_000_000)
    with db.write() as conn:  # once only
        assert ledger.expire_holds(conn, now=doomed.expires_at_ms + 1000) == []
    assert balances(db, alice) == (800_000_000, 200_000_000)

    before = snapshot(db)
    with pytest.raises(HoldClosed) as err, db.write() as conn:  # the late settlement
        ledger.settle_hold(conn, doomed.id, 100_000_000, idempotency_key="req-1",
                           at_ms=clock.now_ms())
    assert "expired" in err.value.message
    assert snapshot(db) == before
    assert posted(db, REVENUE) == 0
    with db.write() as conn:
        assert ledger.settle_hold(conn, alive.id, 50_000_000, idempotency_key="req-2",
                                  at_ms=clock.now_ms()) == (
            Settlement(alive.id, 50_000_000, 50_000_000, 0, 0, 150_000_000))
    assert balances(db, alice) == (950_000_000, 0)
    assert_verified(db)


def test_expire_holds_respects_limit(db: Database) -> None:
    alice = new_account(db, topup_nano=1 * USD)
    with db.write() as conn:
        hs = [ledger.place_hold(conn, alice, 100_000_000, idempotency_key=f"h{i}", ttl_ms=0,
                                at_ms=clock.now_ms())
              for i in range(5)]
    now = max(h.expires_at_ms for h in hs)
    with db.write() as conn:
        assert len(ledger.expire_holds(conn, now=now, limit=3)) == 3
    assert balances(db, alice) == (800_000_000, 200_000_000)
    with db.write() as conn:
        assert len(ledger.expire_holds(conn, now=now, limit=3)) == 2
    assert balances(db, alice) == (1_000_000_000, 0)
    assert_verified(db)


# --------------------------------------------------------------------------- verify


def busy_ledger(db: Database) -> tuple[int, int]:
    """A small ledger with every kind of movement; returns (alice, bob)."""
    alice = new_account(db, topup_nano=10 * USD)
    bob = new_account(db, "bob", topup_nano=1 * USD)
    with db.write() as conn:
        key = insert_key(conn, account_id=alice, prefix="tw-x", key_hash="h1", name=None,
                         group=None, models=None, quota_nano=20 * USD, expires_at_ms=None,
                         at_ms=0)
        h1 = ledger.place_hold(conn, alice, 2 * USD, idempotency_key="h1", ttl_ms=HOUR_MS,
                               key_id=key.id, at_ms=clock.now_ms())
        ledger.settle_hold(conn, h1.id, 1 * USD, idempotency_key="s1", at_ms=clock.now_ms())
        h2 = ledger.place_hold(conn, alice, 1 * USD, idempotency_key="h2", ttl_ms=HOUR_MS,
                               at_ms=clock.now_ms())
        ledger.void_hold(conn, h2.id, at_ms=clock.now_ms())
        ledger.place_hold(conn, alice, 1 * USD, idempotency_key="h3", ttl_ms=HOUR_MS,
                          key_id=key.id, at_ms=clock.now_ms())  # stays open
        h4 = ledger.place_hold(conn, bob, 1 * USD, idempotency_key="h4", ttl_ms=0,
                               at_ms=clock.now_ms())
        ledger.expire_holds(conn, now=h4.expires_at_ms)
        h5 = ledger.place_hold(conn, bob, 1 * USD, idempotency_key="h5", ttl_ms=HOUR_MS,
                               at_ms=clock.now_ms())
        ledger.settle_hold(conn, h5.id, 2 * USD, idempotency_key="s5",
                           at_ms=clock.now_ms())  # 1 USD shortfall
        ledger.adjust(conn, alice, -1, idempotency_key="a1", at_ms=clock.now_ms())
    assert balances(db, alice) == (7_999_999_999, 1_000_000_000)
    assert balances(db, bob) == (0, 0)
    assert posted(db, WRITEOFF) == -1_000_000_000
    assert_verified(db)
    return alice, bob


def problems(db: Database) -> list[str]:
    with db.read() as conn:
        return verify(conn)


def test_verify_names_each_kind_of_corruption(db: Database) -> None:
    """Corrupt the stored data directly, one way at a time: verify names the problem; undo
    the corruption: verify is clean again."""
    alice, _ = busy_ledger(db)

    def corrupted(do: str, undo: str, **params: Any) -> list[str]:
        with db.write() as conn:
            conn.execute(sa.text(do), params)
        found = problems(db)
        with db.write() as conn:
            conn.execute(sa.text(undo), params)
        assert problems(db) == []
        return found

    # a wallet whose stored balance disagrees with its postings
    found = corrupted("UPDATE accounts SET available_nano = available_nano + 5 WHERE id = :id",
                      "UPDATE accounts SET available_nano = available_nano - 5 WHERE id = :id",
                      id=alice)
    assert found == [(f"account {alice} (alice): stored balance 9.000000004 USD (available "
                      "8.000000004 + held 1.000000000) but its postings sum to 8.999999999 USD"),
                     (f"account {alice} (alice): its daily movements add up to 8.999999999 USD "
                      "but its balance is 9.000000004 USD")]

    # a posting that unbalances its entry (and the ledger, and revenue)
    with db.read() as conn:
        entry_id = conn.execute(sa.select(sa.func.max(entries.c.id))).scalar_one()
    found = corrupted("INSERT INTO postings (entry_id, account_id, bucket, amount_nano) "
                      "VALUES (:entry, 2, 'available', 5)",
                      "DELETE FROM postings WHERE entry_id = :entry AND amount_nano = 5",
                      entry=entry_id)
    assert "postings sum to 0.000000005 USD, not zero" in found
    assert f"entry {entry_id}: postings sum to 0.000000005 USD" in found
    assert any("revenue postings total 3.000000005 USD but settled charges total "
               "3.000000000 USD" in p for p in found), found

    # an open hold closed behind the ledger's back: the held balance has no open hold
    with db.read() as conn:
        open_id = conn.execute(sa.select(holds.c.id).where(holds.c.status == "open")).scalar()
    found = corrupted("UPDATE holds SET status = 'voided' WHERE id = :id",
                      "UPDATE holds SET status = 'open' WHERE id = :id", id=open_id)
    assert (f"account {alice} (alice): held 1.000000000 USD but its open holds total "
            "0.000000000 USD") in found
    assert not any(p.startswith(f"hold {open_id} ") for p in found)  # a void books nothing

    # a hold booked in the ledger the old way: available -> held
    found = corrupted("INSERT INTO postings (entry_id, account_id, bucket, amount_nano) "
                      "VALUES (:entry, :id, 'held', 5), (:entry, :id, 'available', -5)",
                      "DELETE FROM postings WHERE entry_id = :entry AND account_id = :id "
                      "AND amount_nano IN (5, -5)", entry=entry_id, id=alice)
    assert found == [(f"account {alice} (alice): stored balance 8.999999999 USD (available "
                      "7.999999999 + held 1.000000000) but its postings sum to 8.999999994 USD"),
                     (f"account {alice} (alice): 0.000000005 USD booked as held in the ledger "
                      "(holds are not booked there)")]

    # a settled hold whose settlement entry is gone (with its postings: still balanced)
    with db.read() as conn:
        settle = conn.execute(sa.select(entries.c.id, entries.c.hold_id)
                              .where(entries.c.idempotency_key == "settle:s1")).one()
    found = corrupted("UPDATE entries SET kind = 'adjust' WHERE id = :id",
                      "UPDATE entries SET kind = 'settle' WHERE id = :id", id=settle.id)
    assert found == [(f"hold {settle.hold_id} is settled but has 0 closing entries "
                     "(0 of them settlements)")]

    # an API key whose usage disagrees with its settled holds
    found = corrupted("UPDATE api_keys SET used_nano = used_nano - 1",
                      "UPDATE api_keys SET used_nano = used_nano + 1")
    assert len(found) == 1 and found[0].startswith("api key "), found
    assert "1.000000000/0.999999999" in found[0], found


# --------------------------------------------------------------------------- the writer


class CommitCounter:
    def __init__(self, db: Database) -> None:
        self.engine = db.write_engine
        self.count = 0
        sa.event.listen(self.engine, "commit", self._on_commit)

    def _on_commit(self, _conn: Any) -> None:
        self.count += 1

    def remove(self) -> None:
        sa.event.remove(self.engine, "commit", self._on_commit)


@pytest.mark.parametrize("max_batch", [512, 4])
def test_writer_commits_in_batches_and_isolates_a_failing_operation(
        db: Database, max_batch: int) -> None:
    alice = new_account(db)
    writer = Writer(db, max_batch=max_batch)
    commits = CommitCounter(db)
    try:
        # Hold the writer inside a first batch so that everything below queues up behind it.
        entered, gate = threading.Event(), threading.Event()

        def blocker(conn: Any) -> str:
            entered.set()
            assert gate.wait(30)
            return "blocker"

        first = writer.submit(blocker)
        assert entered.wait(30)
        seen: list[Any] = []

        def tracked(fn: Any) -> Any:
            def op(conn: Any) -> Any:
                seen.append(conn)
                return fn(conn)
            return op

        ops = [
            *[tracked(lambda c, i=i: ledger.topup(c, alice, i * USD, idempotency_key=f"t{i}",
                                                  at_ms=clock.now_ms()))
              for i in range(1, 6)],  # 1+2+3+4+5 = 15 USD
            tracked(lambda c: ledger.place_hold(c, alice, 16 * USD, idempotency_key="too-big",
                                                ttl_ms=HOUR_MS, at_ms=clock.now_ms())),  # refused
            tracked(lambda c: ledger.place_hold(c, alice, 3 * USD, idempotency_key="fits",
                                                ttl_ms=HOUR_MS, at_ms=clock.now_ms())),
            tracked(lambda c: ledger.topup(c, alice, 500_000_000, idempotency_key="t6",
                                           at_ms=clock.now_ms())),
            # a statement the database itself refuses (duplicate primary key)
            tracked(lambda c: c.execute(accounts.insert().values(
                id=FUNDING, name="dup", kind="system", group_name="system",
                created_at_ms=0))),
            tracked(lambda c: ledger.topup(c, alice, 1, idempotency_key="t7",
                                           at_ms=clock.now_ms())),
        ]
        futures = [writer.submit(op) for op in ops]
        gate.set()
        assert first.result(30) == "blocker"
        results: list[Any] = []
        for fut in futures:
            exc = fut.exception(30)
            results.append(exc if exc is not None else fut.result())
    finally:
        writer.close()
        commits.remove()

    assert [r.balance_nano for r in results[:5]] == [1_000_000_000, 3_000_000_000,
                                                     6_000_000_000, 10_000_000_000,
                                                     15_000_000_000]
    assert isinstance(results[5], InsufficientBalance)
    assert isinstance(results[6], Hold) and results[6].amount_nano == 3_000_000_000
    assert results[7].balance_nano == 12_500_000_000
    assert isinstance(results[8], sa.exc.IntegrityError)
    assert results[9].balance_nano == 12_500_000_001
    # the blocker's batch, then the ten queued operations: one batch or ceil(10/4) batches
    assert commits.count == (2 if max_batch == 512 else 4)
    # A batch runs bare first; one in which an operation raises is rolled back and run
    # again with a savepoint per operation, so operations may run more than once, but each
    # one's effect is committed exactly once (the balances and rows below).
    assert len(seen) > 10
    assert balances(db, alice) == (12_500_000_001, 3_000_000_000)
    assert (rows(db, entries), rows(db, holds)) == (7, 1)  # 7 top-ups; the hold books none
    assert_verified(db)


def test_writer_results_are_durable_when_returned(db: Database, db_url: str) -> None:
    alice = new_account(db)
    writer = Writer(db)
    try:
        def op(i: int) -> Any:
            return lambda c: ledger.topup(c, alice, USD, idempotency_key=f"w{i}",
                                          at_ms=clock.now_ms())

        futures = [writer.submit(op(i)) for i in range(100)]
        results = [f.result(30) for f in futures]
    finally:
        writer.close()
    assert sorted(r.balance_nano for r in results) == [i * USD for i in range(1, 101)]
    other = Database(db_url)  # another engine sees everything committed
    try:
        assert balances(other, alice) == (100_000_000_000, 0)
    finally:
        other.dispose()
    assert_verified(db)
