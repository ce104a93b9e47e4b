"""Spend caps and the concurrency limit in the ledger, the rate-limit window in metering, the
calendar periods and the catalog's tiers — on SQLite and PostgreSQL where storage is involved.

The property test draws random sequences of holds (at random times crossing days, weeks and
months), settlements up to the hold, voids and expiries on a key with a daily, weekly and
monthly cap: after every step each period's held + spent stays within its cap, and the
``key_spend`` counters equal what the key's holds say.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tollway import clock
from tollway.billing import limits, metering
from tollway.billing.limits import Limits
from tollway.errors import (
    CatalogError,
    HoldClosed,
    InsufficientBalance,
    QuotaExceeded,
    RateLimited,
)
from tollway.ledger import guards, ledger, periods
from tollway.ledger.guards import KeyWindow, RateAdmission
from tollway.ledger.verify import verify
from tollway.pricing.catalog import Tier, parse_catalog
from tollway.store.accounts import KeyLimits, create_account, get_key, insert_key
from tollway.store.db import Database
from tollway.store.tables import holds, key_spend

USD = 1_000_000_000
DAY_MS = 86_400_000
CAPS = {"day": 3 * USD, "week": 8 * USD, "month": 15 * USD}
#: Sunday 2026-05-31 20:00 UTC: the first steps cross a day, a week and a month at once.
T0 = int(datetime(2026, 5, 31, 20, tzinfo=UTC).timestamp()) * 1000
EXAMPLES = {"sqlite": 60, "postgresql": 25}
_example = itertools.count()


def _account_and_key(conn: Any, name: str, *, usd: int = 1000,
                     key_limits: KeyLimits | None = None) -> tuple[int, int]:
    account = create_account(conn, name, "default", at_ms=0).id
    ledger.topup(conn, account, usd * USD, idempotency_key=f"seed-{name}", at_ms=clock.now_ms())
    key = insert_key(conn, account_id=account, prefix="tw-x", key_hash=f"h-{name}", name=None,
                     group=None, models=None, quota_nano=None, expires_at_ms=None, at_ms=0,
                     limits=key_limits).id
    return account, key


# --------------------------------------------------------------------------- the property


def _check_caps(conn: Any, key_id: int) -> None:
    rows = conn.execute(sa.select(key_spend).where(key_spend.c.key_id == key_id)).all()
    for row in rows:
        assert row.spent_nano + row.held_nano <= CAPS[row.period], row
        assert row.held_nano >= 0
    expected: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for h in conn.execute(sa.select(holds).where(holds.c.key_id == key_id)):
        for period in periods.PERIODS:
            if h.cap_periods & periods.PERIOD_BITS[period]:
                start = periods.bounds(h.created_at_ms, period)[0]
                if h.status == "open":
                    expected[(period, start)][1] += h.amount_nano
                elif h.status == "settled":
                    expected[(period, start)][0] += h.charged_nano
    stored = {(r.period, r.period_start_ms): [r.spent_nano, r.held_nano] for r in rows}
    assert {k: v for k, v in stored.items() if v != [0, 0]} == {
        k: v for k, v in expected.items() if v != [0, 0]}


operation = st.one_of(
    st.tuples(st.just("hold"), st.integers(1, 4 * USD), st.integers(0, 2 * DAY_MS)),
    st.tuples(st.just("hold"), st.sampled_from([USD, 2 * USD, 3 * USD]), st.just(0)),
    st.tuples(st.just("settle"), st.integers(0, 1000), st.integers(0, 100)),
    st.tuples(st.just("void"), st.integers(0, 1000)),
    st.tuples(st.just("expire"), st.integers(0, 3 * DAY_MS)),
)


def test_caps_are_never_exceeded_and_counters_match_the_holds(db: Database) -> None:
    @settings(max_examples=EXAMPLES[db.dialect], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(ops=st.lists(operation, min_size=5, max_size=30))
    def sequence(ops: list[tuple[Any, ...]]) -> None:
        n = next(_example)
        caps = KeyLimits(daily_cap_nano=CAPS["day"], weekly_cap_nano=CAPS["week"],
                         monthly_cap_nano=CAPS["month"])
        with db.write() as conn:
            account, key_id = _account_and_key(conn, f"cap{n}", key_limits=caps)
        now = T0
        placed: list[int] = []
        for step, op in enumerate(ops):
            try:
                with db.write() as conn:
                    if op[0] == "hold":
                        now += op[2]
                        hold = ledger.place_hold(conn, account, op[1], ttl_ms=DAY_MS,
                                                 idempotency_key=f"c{n}-{step}", key_id=key_id,
                                                 at_ms=now)
                        placed.append(hold.id)
                    elif op[0] == "settle" and placed:
                        hold_id = placed[op[1] % len(placed)]
                        amount = conn.execute(sa.select(holds.c.amount_nano)
                                              .where(holds.c.id == hold_id)).scalar_one()
                        ledger.settle_hold(conn, hold_id, amount * op[2] // 100,
                                           idempotency_key=f"c{n}-{step}", at_ms=clock.now_ms())
                    elif op[0] == "void" and placed:
                        ledger.void_hold(conn, placed[op[1] % len(placed)],
                                         at_ms=clock.now_ms())
                    elif op[0] == "expire":
                        now += op[1]
                        ledger.expire_holds(conn, now)
            except (QuotaExceeded, HoldClosed):
                pass
            with db.read() as conn:
                _check_caps(conn, key_id)
        with db.write() as conn:
            ledger.expire_holds(conn, now + 10 * DAY_MS)
            _check_caps(conn, key_id)
            assert get_key(conn, key_id).held_nano == 0
            assert conn.execute(sa.select(sa.func.sum(key_spend.c.held_nano))
                                .where(key_spend.c.key_id == key_id)).scalar_one() in (0, None)
            assert verify(conn) == []

    sequence()


def test_a_cap_refusal_names_the_period_and_when_it_resets(db: Database) -> None:
    with db.write() as conn:
        account, key_id = _account_and_key(
            conn, "refusal", key_limits=KeyLimits(daily_cap_nano=USD))
        ledger.place_hold(conn, account, USD, ttl_ms=DAY_MS, idempotency_key="a", key_id=key_id,
                          at_ms=T0)
    with pytest.raises(QuotaExceeded) as caught, db.write() as conn:
        ledger.place_hold(conn, account, 1, ttl_ms=DAY_MS, idempotency_key="b", key_id=key_id,
                          at_ms=T0 + 1)
    assert caught.value.retry_after_s == 4 * 3600  # 20:00:00.001 → midnight, rounded up
    assert "daily spending cap of 1.000000000 USD" in caught.value.message
    with db.write() as conn:  # the next day has its own cap
        ledger.place_hold(conn, account, USD, ttl_ms=DAY_MS, idempotency_key="c", key_id=key_id,
                          at_ms=T0 + 4 * 3600_000)


# --------------------------------------------------------------------------- concurrency


def test_concurrency_is_open_holds_and_an_expired_hold_stops_counting(db: Database) -> None:
    with db.write() as conn:
        account, key_id = _account_and_key(conn, "conc")

    def hold(name: str, at: int) -> ledger.Hold:
        with db.write() as conn:
            return ledger.place_hold(conn, account, USD, ttl_ms=1000, idempotency_key=name,
                                     key_id=key_id, rate=RateAdmission(max_open=2), at_ms=at)

    first, second = hold("a", T0), hold("b", T0)
    with pytest.raises(RateLimited) as caught:
        hold("c", T0)
    assert caught.value.retry_after_s == 1
    with db.write() as conn:
        ledger.settle_hold(conn, first.id, USD // 2, idempotency_key="a", at_ms=clock.now_ms())
    third = hold("d", T0)
    with pytest.raises(RateLimited):
        hold("e", T0)
    with db.write() as conn:  # the reaper releases the expired holds: they stop counting
        released = ledger.expire_holds(conn, T0 + 1000)
    assert sorted(r.hold_id for r in released) == sorted([second.id, third.id])
    hold("f", T0 + 1000)
    with db.read() as conn:
        assert conn.execute(sa.text("SELECT open_holds FROM api_keys WHERE id = :k"),
                            {"k": key_id}).scalar_one() == 1


# --------------------------------------------------------------------------- windows


def test_the_window_is_counted_in_the_holds_statement(db: Database) -> None:
    """A request the balance refuses (402) leaves no trace in the window; one the window
    refuses leaves no hold; settlement replaces the counted estimate by the actual tokens."""
    with db.write() as conn:
        account, key_id = _account_and_key(conn, "win", usd=1)
    rules = Limits(rpm=2, tpm=100)

    def reserve(name: str, amount: int, tokens: int, at: int) -> metering.Reservation:
        with db.write() as conn:
            result = metering.reserve(conn, request_id=name, account_id=account, key_id=key_id,
                                      amount_nano=amount, ttl_ms=DAY_MS, limits=rules,
                                      tokens=tokens, at_ms=at)
        assert isinstance(result, metering.Reservation)
        return result

    with pytest.raises(InsufficientBalance) as poor:
        reserve("too-dear", 2 * USD, 10, T0)
    assert dict(poor.value.headers)[b"x-ratelimit-remaining-requests"] == b"2"
    first = reserve("one", 1000, 30, T0)
    assert first.window is not None
    assert (first.window.requests, first.window.tokens) == (1, 30)
    with db.write() as conn:  # actual 20 + 45 tokens
        ledger.settle_hold(conn, first.hold.id, 500, idempotency_key="one",
                           correction=limits.correction(first.window, counted=30, actual=65),
                           at_ms=clock.now_ms())
    with pytest.raises(RateLimited) as caught:  # 65 + 40 > 100
        reserve("two", 1000, 40, T0 + 59_000)
    assert caught.value.retry_after_s == 1
    assert "limit of 100 tokens per minute is reached" in caught.value.message
    assert dict(caught.value.headers)[b"x-ratelimit-remaining-tokens"] == b"35"
    second = reserve("three", 1000, 35, T0 + 59_999)
    assert second.window is not None and second.window.headers() == [
        (b"x-ratelimit-limit-requests", b"2"), (b"x-ratelimit-remaining-requests", b"0"),
        (b"x-ratelimit-reset-requests", b"1s"), (b"x-ratelimit-limit-tokens", b"100"),
        (b"x-ratelimit-remaining-tokens", b"0"), (b"x-ratelimit-reset-tokens", b"1s")]
    with pytest.raises(RateLimited, match="requests per minute"):
        reserve("four", 1000, 0, T0 + 59_999)
    third = reserve("five", 1000, 0, T0 + 60_000)  # a new minute
    assert third.window is not None and (third.window.requests, third.window.tokens) == (1, 0)
    with pytest.raises(RateLimited, match="exceed the key's limit of 100 tokens"):
        reserve("huge", 1000, 101, T0 + 60_000)
    # a late correction for the previous minute does not touch this one
    with db.write() as conn:
        ledger.void_hold(conn, second.hold.id,
                         correction=limits.correction(second.window, counted=35, actual=0),
                         at_ms=clock.now_ms())
        assert guards.key_window(conn, key_id) == KeyWindow(T0 - T0 % 60_000 + 60_000, 1, 0)
        # an instance whose clock lags counts in the current window, it does not restart it
    late = reserve("late", 1000, 5, T0 + 59_000)
    assert late.window is not None and (late.window.start_ms, late.window.requests,
                                        late.window.tokens) == (T0 - T0 % 60_000 + 60_000, 2, 5)
    with db.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(holds)
                            .where(holds.c.key_id == key_id)).scalar_one() == 4


# --------------------------------------------------------------------------- periods


def test_periods_follow_the_billing_time_zone() -> None:
    paris = periods.zone("Europe/Paris")
    at = int(datetime(2026, 3, 29, 12, tzinfo=UTC).timestamp()) * 1000  # DST starts that day

    def local(ms: int) -> str:
        return datetime.fromtimestamp(ms // 1000, paris).isoformat()

    start, end = periods.bounds(at, "day", paris)
    assert (local(start), local(end), (end - start) // 3600_000) == (
        "2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", 23)
    start, end = periods.bounds(at, "week", paris)
    assert (local(start), local(end)) == ("2026-03-23T00:00:00+01:00",
                                          "2026-03-30T00:00:00+02:00")
    december = int(datetime(2026, 12, 31, 23, 30, tzinfo=UTC).timestamp()) * 1000
    start, end = periods.bounds(december, "month", paris)  # already January in Paris
    assert (local(start), local(end)) == ("2027-01-01T00:00:00+01:00",
                                          "2027-02-01T00:00:00+01:00")
    assert periods.bounds(december, "month", periods.zone("UTC")) == (
        int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()) * 1000,
        int(datetime(2027, 1, 1, tzinfo=UTC).timestamp()) * 1000)


# --------------------------------------------------------------------------- the catalog


def test_catalog_tiers_are_read_in_order_with_upgrade_thresholds() -> None:
    catalog = parse_catalog("""
tiers:
  free: {rpm: 60, tpm: 60000, concurrency: 5}
  starter: {rpm: 600, tpm: 600000, concurrency: 20}
  growth: {rpm: 3000, tpm: 3000000, concurrency: 50}
tier_upgrades: {starter: "0.01", growth: "100.5"}
""")
    assert catalog.tiers == (Tier("free", 60, 60000, 5), Tier("starter", 600, 600000, 20,
                                                              10_000_000),
                             Tier("growth", 3000, 3000000, 50, 100_500_000_000))
    assert catalog.default_tier == "free"


def test_catalog_tier_problems_are_all_reported() -> None:
    with pytest.raises(CatalogError) as caught:
        parse_catalog("""
tiers:
  free: {rpm: 0, tpm: 60000, concurrency: 5, burst: 3}
  starter: {rpm: 600, tpm: 1.5, concurrency: 20}
  growth: {rpm: 3000, tpm: 3000000, concurrency: 50}
tier_upgrades: {starter: "10", growth: "5", gold: "1"}
default_tier: platinum
""", source="cat.yaml")
    assert caught.value.problems == [
        "cat.yaml: tier_upgrades[gold]: unknown tier",
        "cat.yaml: tiers[free].burst: unknown field",
        "cat.yaml: tiers[free].rpm: must be a positive integer, got 0",
        "cat.yaml: tiers[starter].tpm: must be a positive integer, got Decimal('1.5')",
        ("cat.yaml: tier_upgrades[growth]: must be more than the threshold of the lower tier "
        "'starter'"),
        "cat.yaml: default_tier: unknown tier 'platinum' (tiers: free, starter, growth)",
    ]


# --------------------------------------------------------------------------- schema, verify


def test_migration_0004_counts_the_holds_already_open(tmp_path: Path) -> None:
    """Upgrading with requests in flight: each key starts with its open holds counted, so
    their settlement brings it back to exactly zero."""
    from tollway.store.migrate import upgrade

    old = Database(f"sqlite:///{tmp_path / 'old.db'}")  # SQLite: the batch (copy) path
    try:
        upgrade(old, "0002")
        with old.write() as conn:
            conn.exec_driver_sql(
                "INSERT INTO accounts (id, name, kind, group_name, available_nano, held_nano, "
                "created_at_ms) VALUES (501, 'old', 'customer', 'default', 0, 7, 0)")
            conn.exec_driver_sql(
                "INSERT INTO api_keys (id, account_id, prefix, key_hash, held_nano, "
                "created_at_ms) VALUES (601, 501, 'tw-x', 'h', 7, 0)")
            for hold_id, status in ((701, "open"), (702, "open"), (703, "settled")):
                conn.exec_driver_sql(
                    "INSERT INTO holds (id, account_id, key_id, amount_nano, status, "
                    f"created_at_ms, expires_at_ms) VALUES ({hold_id}, 501, 601, "
                    f"{3 if hold_id == 701 else 4}, '{status}', 0, 10)")
        upgrade(old)
        with old.read() as conn:
            assert get_key(conn, 601).held_nano == 7
            assert conn.execute(sa.text("SELECT open_holds FROM api_keys WHERE id = 601")
                                ).scalar_one() == 2
    finally:
        old.dispose()


def test_verify_names_counters_that_disagree_with_the_open_holds(db: Database) -> None:
    with db.write() as conn:
        account, key_id = _account_and_key(conn, "ver",
                                           key_limits=KeyLimits(weekly_cap_nano=5 * USD))
        ledger.place_hold(conn, account, USD, ttl_ms=DAY_MS, idempotency_key="v1",
                          key_id=key_id, at_ms=T0)
        assert verify(conn) == []
        conn.execute(sa.text("UPDATE api_keys SET open_holds = 3 WHERE id = :k"), {"k": key_id})
        conn.execute(sa.text("UPDATE key_spend SET held_nano = 2 WHERE key_id = :k"),
                     {"k": key_id})
        start = periods.bounds(T0, "week")[0]
        assert verify(conn) == [
            f"API key {key_id}: 3 requests in flight recorded but 1 open holds",
            (f"API key {key_id}: 0.000000002 USD held in its week from {start} ms but its open "
            "holds there total 1.000000000 USD")]
