"""The money path's structure, as behaviour: one function computes every charge
(``metering.rate``), a settlement is stamped by one clock, and a key's refusal carries its
rate-limit window (``ledger.guards``). On SQLite and PostgreSQL (the ``db`` fixture)."""

from __future__ import annotations

from decimal import Decimal

import pytest
import sqlalchemy as sa

from tollway.billing import metering
from tollway.billing.limits import Limits
from tollway.errors import RateLimited
from tollway.ledger import guards, ledger
from tollway.ledger.guards import KeyWindow, RateAdmission
from tollway.pricing.rating import AppliedRatio, CallPrice, CallUsage, TokenPrice, TokenUsage
from tollway.store.accounts import create_account, insert_key
from tollway.store.db import Database
from tollway.store.tables import entries, holds, usage_records, wallet_days

USD = 1_000_000_000
T0 = 1_760_000_000_000  # 2025-10-09T08:53:20Z
RATIO = AppliedRatio(Decimal("1.5"), "group")


def test_rate_prices_tokens_and_calls_and_refuses_a_mismatch() -> None:
    # 1000 prompt (200 cached) at 2 / 0.5 USD per 1M, 300 output at 8: 800*2 + 200*0.5 +
    # 300*8 = 4100 USD per 1M tokens -> 0.0041 USD, x 1.5 = 0.00615 USD
    tokens = metering.rate(TokenUsage(1000, 300, cached_tokens=200),
                           TokenPrice(Decimal(2), Decimal(8), Decimal("0.5")), RATIO)
    assert tokens.cost_nano_usd == 6_150_000
    # 3 images at the size's 0.04 USD, x 1.5 = 0.18 USD
    calls = metering.rate(CallUsage(3), CallPrice(Decimal("0.02"), {"1024x1024": Decimal("0.04")}),
                          RATIO, unit_price=Decimal("0.04"))
    assert calls.cost_nano_usd == 180_000_000
    with pytest.raises(TypeError):
        metering.rate(CallUsage(1), TokenPrice(Decimal(1), Decimal(1)), RATIO)


def _account_and_key(db: Database) -> tuple[int, int]:
    with db.write() as conn:
        account = create_account(conn, "alice", "default", at_ms=0).id
        ledger.topup(conn, account, 10 * USD, idempotency_key="seed", at_ms=T0)
        key = insert_key(conn, account_id=account, prefix="tw-x", key_hash="h", name=None,
                         group=None, models=None, quota_nano=None, expires_at_ms=None,
                         at_ms=0).id
    return account, key


def test_a_settlement_is_stamped_by_one_clock(db: Database) -> None:
    account, key = _account_and_key(db)
    at = T0 + 86_400_000 + 5  # the next UTC day: the charge counts there, not on the top-up's
    with db.write() as conn:
        hold = ledger.place_hold(conn, account, USD, idempotency_key="r1", ttl_ms=60_000,
                                 at_ms=T0, key_id=key)
        ledger.settle_hold(conn, hold.id, 250_000_000, idempotency_key="r1", at_ms=at)
    with db.read() as conn:
        stamped = conn.execute(sa.select(entries.c.kind, entries.c.created_at_ms)
                               .order_by(entries.c.id)).all()
        closed = conn.execute(sa.select(holds.c.closed_at_ms)).scalar_one()
        days = conn.execute(sa.select(wallet_days.c.day_ms, wallet_days.c.topups_nano,
                                      wallet_days.c.charges_nano)
                            .order_by(wallet_days.c.day_ms)).all()
    assert [tuple(r) for r in stamped] == [("topup", T0), ("hold", T0), ("settle", at)]
    assert closed == at
    assert [tuple(r) for r in days] == [(T0 - T0 % 86_400_000, 10 * USD, 0),
                                        (at - at % 86_400_000, 0, 250_000_000)]


def test_metering_settle_books_the_charge_and_its_record_at_one_time(db: Database) -> None:
    account, key = _account_and_key(db)
    with db.write() as conn:
        reserved = metering.reserve(conn, request_id="req-1", account_id=account, key_id=key,
                                    amount_nano=USD, ttl_ms=60_000, at_ms=T0)
        assert isinstance(reserved, metering.Reservation)
        charge = metering.rate(CallUsage(1), CallPrice(Decimal("0.1")), RATIO)
        record = {"request_id": "req-1", "created_at_ms": T0, "account_id": account,
                  "key_id": key, "key_name": None, "group_name": "default", "ratio": "1.5",
                  "ratio_source": "group", "type": "consume", "billing_type": "per_call",
                  "product": "search", "route": "/apis/v1/x", "status": 200, "stream": False,
                  "duration_ms": 1, "ttft_ms": 1, "input_tokens": 0,
                  "cached_input_tokens": 0, "cache_write_tokens": 0,
                  "cache_write_1h_tokens": 0, "output_tokens": 0, "reasoning_tokens": 0,
                  "calls": 1, "price_version_id": None, "usage_source": "upstream",
                  "error_code": None, "note": None, "per_call_nano": 100_000_000,
                  "channel": None, "attempts": None, "upstream_cost_nano": None,
                  "upstream_reported_cost_nano": None, "upstream_cost_mismatch": None,
                  "tool_calls": None,
                  **{f"{p}_nano_per_1m": None for p in ("input", "output", "cache_read",
                                                         "cache_write", "cache_write_1h")}}
        settled = metering.settle(conn, hold_id=reserved.hold.id, charge=charge,
                                  record=record, at_ms=T0 + 7)
    assert settled.charged_nano == 150_000_000  # 0.1 USD x 1.5
    with db.read() as conn:
        usage = conn.execute(sa.select(usage_records.c.created_at_ms, usage_records.c.cost_nano)
                             .where(usage_records.c.request_id == "req-1")).one()
        entry = conn.execute(sa.select(entries.c.created_at_ms)
                             .where(entries.c.kind == "settle")).scalar_one()
    assert tuple(usage) == (T0 + 7, 150_000_000)
    assert entry == T0 + 7


def test_a_key_refusal_carries_its_window_without_the_request(db: Database) -> None:
    account, key = _account_and_key(db)
    minute = T0 - T0 % 60_000
    rate = RateAdmission(window_start_ms=minute, tokens=40, rpm=2, tpm=1000)
    with db.write() as conn:
        first = ledger.place_hold(conn, account, 1000, idempotency_key="a", ttl_ms=60_000,
                                  at_ms=T0, key_id=key, rate=rate)
        ledger.place_hold(conn, account, 1000, idempotency_key="b", ttl_ms=60_000,
                          at_ms=T0, key_id=key, rate=rate)
    assert first.window == KeyWindow(minute, 1, 40)
    with pytest.raises(RateLimited) as caught, db.write() as conn:
        ledger.place_hold(conn, account, 1000, idempotency_key="c", ttl_ms=60_000, at_ms=T0,
                          key_id=key, rate=rate)
    assert isinstance(caught.value, guards.KeyRateLimited)
    assert caught.value.window == KeyWindow(minute, 2, 80)
    with db.read() as conn:
        assert guards.key_window(conn, key) == KeyWindow(minute, 2, 80)
    assert Limits(rpm=2).windowed
