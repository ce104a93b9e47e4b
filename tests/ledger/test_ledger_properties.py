"""Property test: any sequence of ledger operations keeps the books exact.

Hypothesis draws sequences of top-ups, holds, settlements (under, at and over the hold,
beyond the balance), voids, expiries, adjustments and retries of earlier operations on a few
wallets. A plain-Python model predicts every result (and every refusal) exactly; after each
sequence the stored balances must equal the model's, ``verify()`` must find nothing, all
postings must sum to zero and no balance may be negative.

One database per test (a fresh one per example would dominate the run time): every example
uses its own wallets and idempotency keys, and ends by expiring all its holds.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollway import clock
from tollway.errors import HoldClosed, InsufficientBalance, QuotaExceeded, TollwayError
from tollway.ledger import ledger
from tollway.ledger.ledger import Adjustment, Hold, Release, Settlement, Topup
from tollway.ledger.verify import verify
from tollway.store.accounts import create_account, get_account, get_key, insert_key
from tollway.store.db import Database
from tollway.store.tables import accounts, postings

USD = 1_000_000_000
REVENUE, WRITEOFF = 2, 3
WALLETS = 3
HOUR_MS = 3_600_000
KEY_QUOTA = 6 * USD  # wallet 0 has an API key with its own quota
EXAMPLES = {"sqlite": 75, "postgresql": 30}

_example = itertools.count()

amounts = st.one_of(st.integers(1, 3 * USD), st.sampled_from([1, USD // 100, USD, 2 * USD]))
wallet = st.integers(0, WALLETS - 1)
pick = st.integers(0, 1_000)  # which earlier hold / operation (modulo how many there are)
hold = st.tuples(st.just("hold"), wallet, amounts, st.sampled_from([0, HOUR_MS]), st.booleans())
# the actual cost: a percentage of the hold plus an overrun (often none)
settle = st.tuples(st.just("settle"), pick, st.one_of(st.integers(0, 100), st.just(100)),
                   st.one_of(st.just(0), st.just(1), st.integers(1, 4 * USD)))
operation = st.one_of(
    st.tuples(st.just("topup"), wallet, amounts),
    hold, hold, settle, settle,  # the interesting ones, twice as often
    st.tuples(st.just("void"), pick),
    st.tuples(st.just("expire")),
    st.tuples(st.just("adjust"), wallet,
              st.integers(-4 * USD, 4 * USD).filter(lambda a: a != 0)),
    st.tuples(st.just("retry"), pick),
)


@dataclass
class Wallet:
    id: int
    available: int = 0
    held: int = 0
    topups: int = 0
    adjustments: int = 0
    charges: int = 0
    shortfalls: int = 0


@dataclass
class ModelHold:
    id: int
    wallet: int
    amount: int
    expires_at_ms: int
    key: bool
    status: str = "open"


@dataclass
class Model:
    wallets: list[Wallet]
    key_id: int
    key_used: int = 0
    key_held: int = 0
    holds: list[ModelHold] = field(default_factory=list)
    done: list[tuple[Any, ...]] = field(default_factory=list)  # (call, expected result)


def system_balance(conn: Any, account_id: int) -> int:
    return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(postings.c.amount_nano), 0))
                            .where(postings.c.account_id == account_id)).scalar_one())


def apply(db: Database, model: Model, op: tuple[Any, ...], key: str) -> None:
    """Run one operation in its own transaction and check its result against the model."""
    kind = op[0]
    call: tuple[Any, ...]
    expected: Any
    if kind == "topup":
        w = model.wallets[op[1]]
        call = ("topup", w.id, op[2], key)
        w.available += op[2]
        w.topups += op[2]
        result = run(db, call)
        assert result == Topup(result.entry_id, w.id, op[2], w.available)
        model.done.append((call, result))
    elif kind == "hold":
        w = model.wallets[op[1]]
        with_key = op[4] and op[1] == 0
        call = ("hold", w.id, op[2], key, op[3], model.key_id if with_key else None)
        if op[2] > w.available:
            assert isinstance(run(db, call), InsufficientBalance)
            return
        if with_key and model.key_used + model.key_held + op[2] > KEY_QUOTA:
            assert isinstance(run(db, call), QuotaExceeded)
            return
        result = run(db, call)
        assert isinstance(result, Hold), result
        assert (result.account_id, result.amount_nano, result.status) == (w.id, op[2], "open")
        w.available -= op[2]
        w.held += op[2]
        if with_key:
            model.key_held += op[2]
        model.holds.append(ModelHold(result.id, op[1], op[2], result.expires_at_ms, with_key))
        model.done.append((call, result))
    elif kind == "settle":
        if not model.holds:
            return
        h = choose_hold(model, op[1])
        actual = h.amount * op[2] // 100 + op[3]
        call = ("settle", h.id, actual, key)
        if h.status != "open":
            assert isinstance(run(db, call), HoldClosed)
            return
        w = model.wallets[h.wallet]
        from_hold = min(actual, h.amount)
        released = h.amount - from_hold
        from_available = min(actual - from_hold, w.available)
        shortfall = actual - from_hold - from_available
        expected = Settlement(h.id, actual, from_hold, from_available, shortfall, released)
        assert run(db, call) == expected
        h.status = "settled"
        w.held -= h.amount
        w.available += released - from_available
        w.charges += actual
        w.shortfalls += shortfall
        if h.key:
            model.key_held -= h.amount
            model.key_used += actual
        model.done.append((call, expected))
    elif kind == "void":
        if not model.holds:
            return
        h = choose_hold(model, op[1])
        call = ("void", h.id, key)
        if h.status == "voided":  # the hold is its own key: a void of a voided hold repeats
            assert run(db, call) == Release(h.id, h.amount, "voided")
            return
        if h.status != "open":
            assert isinstance(run(db, call), HoldClosed)
            return
        expected = Release(h.id, h.amount, "voided")
        assert run(db, call) == expected
        release(model, h, "voided")
        model.done.append((call, expected))
    elif kind == "expire":
        now = clock.now_ms()
        due = [h for h in model.holds if h.status == "open" and h.expires_at_ms <= now]
        result = run(db, ("expire", now))
        assert sorted(result, key=lambda r: r.hold_id) == [
            Release(h.id, h.amount, "expired") for h in due]
        for h in due:
            release(model, h, "expired")
    elif kind == "adjust":
        w = model.wallets[op[1]]
        call = ("adjust", w.id, op[2], key)
        if w.available + op[2] < 0:
            assert isinstance(run(db, call), InsufficientBalance)
            return
        w.available += op[2]
        w.adjustments += op[2]
        result = run(db, call)
        assert result == Adjustment(result.entry_id, w.id, op[2], w.available)
        model.done.append((call, result))
    elif kind == "retry":  # the same call again, same key: the first result, nothing moves
        if not model.done:
            return
        call, expected = model.done[op[1] % len(model.done)]
        result = run(db, call)
        if call[0] == "hold":  # the hold as it is now (it may have been closed since)
            assert (result.id, result.amount_nano) == (expected.id, expected.amount_nano)
        else:
            assert result == expected
    else:
        raise AssertionError(kind)


def choose_hold(model: Model, pick: int) -> ModelHold:
    """Mostly an open hold; one time in four any hold (then often a closed one)."""
    open_holds = [h for h in model.holds if h.status == "open"]
    candidates = open_holds if pick % 4 and open_holds else model.holds
    return candidates[pick // 4 % len(candidates)]


def release(model: Model, h: ModelHold, status: str) -> None:
    w = model.wallets[h.wallet]
    h.status = status
    w.held -= h.amount
    w.available += h.amount
    if h.key:
        model.key_held -= h.amount


def run(db: Database, call: tuple[Any, ...]) -> Any:
    """One ledger call in its own transaction; a refusal is returned (and rolled back)."""
    try:
        with db.write() as conn:
            match call:
                case ("topup", account_id, amount, key):
                    return ledger.topup(conn, account_id, amount, idempotency_key=key,
                                        at_ms=clock.now_ms())
                case ("hold", account_id, amount, key, ttl, key_id):
                    return ledger.place_hold(conn, account_id, amount, idempotency_key=key,
                                             ttl_ms=ttl, key_id=key_id, at_ms=clock.now_ms())
                case ("settle", hold_id, amount, key):
                    return ledger.settle_hold(conn, hold_id, amount, idempotency_key=key,
                                              at_ms=clock.now_ms())
                case ("void", hold_id, key):
                    return ledger.void_hold(conn, hold_id, at_ms=clock.now_ms())
                case ("expire", now):
                    return ledger.expire_holds(conn, now=now)
                case ("adjust", account_id, amount, key):
                    return ledger.adjust(conn, account_id, amount, idempotency_key=key,
                                         at_ms=clock.now_ms())
        raise AssertionError(call)
    except TollwayError as exc:
        return exc


def check(db: Database, model: Model, revenue0: int, writeoff0: int) -> None:
    with db.read() as conn:
        assert verify(conn) == []
        assert system_balance(conn, REVENUE) - revenue0 == sum(w.charges for w in model.wallets)
        assert system_balance(conn, WRITEOFF) - writeoff0 == -sum(
            w.shortfalls for w in model.wallets)
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(postings.c.amount_nano),
                                                        0))).scalar_one()
        assert total == 0
        lowest = conn.execute(sa.select(sa.func.min(accounts.c.available_nano),
                                        sa.func.min(accounts.c.held_nano))).one()
        assert lowest[0] >= 0 and lowest[1] >= 0
        for w in model.wallets:
            stored = get_account(conn, w.id)
            assert (stored.available_nano, stored.held_nano) == (w.available, w.held)
            assert w.available >= 0 and w.held >= 0
            assert w.available + w.held == (w.topups + w.adjustments - w.charges
                                            + w.shortfalls)
            assert stored.used_nano == w.charges
        api_key = get_key(conn, model.key_id)
        assert (api_key.used_nano, api_key.held_nano) == (model.key_used, model.key_held)


def test_random_operation_sequences_keep_the_books_exact(db: Database) -> None:
    @settings(max_examples=EXAMPLES[db.dialect], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(opening=st.lists(st.one_of(st.just(0), st.integers(1, 8 * USD)),
                            min_size=WALLETS, max_size=WALLETS),
           ops=st.lists(operation, min_size=10, max_size=40))
    def sequence(opening: list[int], ops: list[tuple[Any, ...]]) -> None:
        n = next(_example)
        with db.write() as conn:
            ids = [create_account(conn, f"p{n}-w{i}", "default", at_ms=0).id
                   for i in range(WALLETS)]
            revenue0, writeoff0 = system_balance(conn, REVENUE), system_balance(conn, WRITEOFF)
            key_id = insert_key(conn, account_id=ids[0], prefix="tw-x", key_hash=f"p{n}",
                                name=None, group=None, models=None, quota_nano=KEY_QUOTA,
                                expires_at_ms=None, at_ms=0).id
        model = Model([Wallet(i) for i in ids], key_id)
        opening_topups = [("topup", i, amount) for i, amount in enumerate(opening) if amount]
        for step, op in enumerate([*opening_topups, *ops]):
            apply(db, model, op, f"p{n}-{step}")
        check(db, model, revenue0, writeoff0)
        # close everything this example left open, so the next one starts clean
        result = run(db, ("expire", max([h.expires_at_ms for h in model.holds], default=0)))
        assert sorted(r.hold_id for r in result) == [h.id for h in model.holds
                                                     if h.status == "open"]
        for h in model.holds:
            if h.status == "open":
                release(model, h, "expired")
        assert all(w.held == 0 for w in model.wallets)
        check(db, model, revenue0, writeoff0)

    sequence()
