"""``tollway ledger verify``: recompute every balance from the postings and name any violation.

Checks, each against the stored state:
- all postings sum to zero, and so do the postings of every single entry;
- each wallet's stored available and held balances equal the sums of its postings;
- no available or held balance is negative;
- each wallet's held balance equals its open holds, each key's held and used amounts equal its
  holds and settlements;
- every hold is closed at most once (one settle, void or expire entry), and an open hold by none;
- the revenue account equals the sum of all settled charges;
- each wallet's daily movements (what statements are made of) add up to its balance;
- every gateway request's usage record agrees with its hold: a ``consume`` record's cost is
  what its hold settled, an ``error`` record's hold was released and cost nothing (or it was
  refused by a limit before any hold), so the usage records sum to exactly the revenue their
  requests brought;
- each key's count of requests in flight equals its open holds, and the held amount of each
  of its spend-cap periods equals the open holds that period counted.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.ledger import periods
from tollway.ledger.ledger import AVAILABLE, HELD, REVENUE
from tollway.money import format_usd
from tollway.store.tables import (
    accounts,
    api_keys,
    entries,
    holds,
    key_spend,
    postings,
    usage_records,
    wallet_days,
)

_CLOSING = ("settle", "void", "expire")


def verify(conn: Connection) -> list[str]:
    problems: list[str] = []
    total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(postings.c.amount_nano), 0)))
    if (value := int(total.scalar_one())) != 0:
        problems.append(f"postings sum to {format_usd(value)} USD, not zero")

    unbalanced = conn.execute(
        sa.select(postings.c.entry_id, sa.func.sum(postings.c.amount_nano))
        .group_by(postings.c.entry_id).having(sa.func.sum(postings.c.amount_nano) != 0)
        .limit(20)).all()
    for entry_id, amount in unbalanced:
        problems.append(f"entry {entry_id}: postings sum to {format_usd(int(amount))} USD")

    sums: dict[tuple[int, str], int] = {
        (int(a), str(b)): int(s) for a, b, s in conn.execute(
            sa.select(postings.c.account_id, postings.c.bucket, sa.func.sum(postings.c.amount_nano))
            .group_by(postings.c.account_id, postings.c.bucket))}
    open_holds: dict[int, int] = {
        int(a): int(s) for a, s in conn.execute(
            sa.select(holds.c.account_id, sa.func.sum(holds.c.amount_nano))
            .where(holds.c.status == "open").group_by(holds.c.account_id))}
    for row in conn.execute(sa.select(accounts).where(accounts.c.kind == "customer")):
        name = f"account {row.id} ({row.name})"
        for bucket, stored in ((AVAILABLE, row.available_nano), (HELD, row.held_nano)):
            derived = sums.get((row.id, bucket), 0)
            if stored != derived:
                problems.append(f"{name}: stored {bucket} balance {format_usd(stored)} USD but "
                                f"its postings sum to {format_usd(derived)} USD")
            if stored < 0:
                problems.append(f"{name}: negative {bucket} balance {format_usd(stored)} USD")
        if row.held_nano != open_holds.get(row.id, 0):
            problems.append(f"{name}: held {format_usd(row.held_nano)} USD but its open holds "
                            f"total {format_usd(open_holds.get(row.id, 0))} USD")

    movements = {int(a): int(n) for a, n in conn.execute(
        sa.select(wallet_days.c.account_id,
                  sa.func.sum(wallet_days.c.topups_nano + wallet_days.c.adjustments_nano
                              + wallet_days.c.grants_nano - wallet_days.c.grants_expired_nano
                              - wallet_days.c.charges_nano))
        .group_by(wallet_days.c.account_id))}
    for row in conn.execute(sa.select(accounts.c.id, accounts.c.name, accounts.c.available_nano,
                                      accounts.c.held_nano)
                            .where(accounts.c.kind == "customer")):
        balance = int(row.available_nano) + int(row.held_nano)
        if movements.get(row.id, 0) != balance:
            problems.append(f"account {row.id} ({row.name}): its daily movements add up to "
                            f"{format_usd(movements.get(row.id, 0))} USD but its balance is "
                            f"{format_usd(balance)} USD")

    key_holds = {int(k): (int(h), int(u)) for k, h, u in conn.execute(
        sa.select(holds.c.key_id,
                  sa.func.coalesce(sa.func.sum(sa.case((holds.c.status == "open",
                                                        holds.c.amount_nano), else_=0)), 0),
                  sa.func.coalesce(sa.func.sum(holds.c.charged_nano), 0))
        .where(holds.c.key_id.is_not(None)).group_by(holds.c.key_id))}
    for key in conn.execute(sa.select(api_keys.c.id, api_keys.c.held_nano, api_keys.c.used_nano)):
        held, used = key_holds.get(key.id, (0, 0))
        if (key.held_nano, key.used_nano) != (held, used):
            problems.append(f"api key {key.id}: stored held/used {format_usd(key.held_nano)}/"
                            f"{format_usd(key.used_nano)} USD but its holds give "
                            f"{format_usd(held)}/{format_usd(used)} USD")

    closers = sa.select(entries.c.hold_id, sa.func.count().label("n")).where(
        entries.c.kind.in_(_CLOSING)).group_by(entries.c.hold_id).subquery()
    bad_holds = conn.execute(
        sa.select(holds.c.id, holds.c.status, sa.func.coalesce(closers.c.n, 0))
        .select_from(holds.outerjoin(closers, closers.c.hold_id == holds.c.id))
        .where(sa.or_(sa.func.coalesce(closers.c.n, 0) > 1,
                      sa.and_(holds.c.status == "open", sa.func.coalesce(closers.c.n, 0) != 0),
                      sa.and_(holds.c.status != "open", sa.func.coalesce(closers.c.n, 0) != 1)))
        .limit(20)).all()
    for hold_id, status, count in bad_holds:
        problems.append(f"hold {hold_id} is {status} but has {count} closing entries")

    charged = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(holds.c.charged_nano), 0)))
                  .scalar_one())
    if charged != sums.get((REVENUE, AVAILABLE), 0):
        problems.append(f"revenue postings total {format_usd(sums.get((REVENUE, AVAILABLE), 0))} "
                        f"USD but settled charges total {format_usd(charged)} USD")

    mismatched = conn.execute(
        sa.select(usage_records.c.request_id, usage_records.c.type, usage_records.c.cost_nano,
                  holds.c.status, holds.c.charged_nano)
        .select_from(usage_records.outerjoin(holds, holds.c.id == usage_records.c.hold_id))
        .where(sa.or_(
            sa.and_(usage_records.c.type == "consume",
                    sa.or_(holds.c.status != "settled",
                           holds.c.charged_nano != usage_records.c.cost_nano)),
            # an error either voided its hold or was refused by a limit before any hold
            sa.and_(usage_records.c.type == "error",
                    sa.or_(usage_records.c.cost_nano != 0,
                           holds.c.status.not_in(("voided", "expired")))),
            sa.and_(usage_records.c.type == "consume", holds.c.id.is_(None))))
        .limit(20)).all()
    for request_id, kind, cost, status, charged in mismatched:
        problems.append(f"usage record {request_id} ({kind}, {format_usd(cost)} USD) disagrees "
                        f"with its hold ({status}, charged "
                        f"{format_usd(charged) if charged is not None else 'nothing'})")
    _verify_key_limits(conn, problems)
    return problems


def _verify_key_limits(conn: Connection, problems: list[str]) -> None:
    """Only open holds are read (few), so this stays cheap on a large ledger."""
    in_flight: dict[int, int] = {}
    held: dict[tuple[int, str, int], int] = {}
    for key_id, amount, created, bits in conn.execute(
            sa.select(holds.c.key_id, holds.c.amount_nano, holds.c.created_at_ms,
                      holds.c.cap_periods)
            .where(holds.c.status == "open", holds.c.key_id.is_not(None))):
        in_flight[key_id] = in_flight.get(key_id, 0) + 1
        for period in periods.PERIODS:
            if bits & periods.PERIOD_BITS[period]:
                start = periods.bounds(created, period)[0]
                held[(key_id, period, start)] = held.get((key_id, period, start), 0) + amount
    for key_id, stored in conn.execute(sa.select(api_keys.c.id, api_keys.c.open_holds)
                                       .where(api_keys.c.open_holds != 0)):
        if stored != in_flight.get(key_id, 0):
            problems.append(f"API key {key_id}: {stored} requests in flight recorded but "
                            f"{in_flight.get(key_id, 0)} open holds")
    for key_id in in_flight.keys() - {r[0] for r in conn.execute(
            sa.select(api_keys.c.id).where(api_keys.c.open_holds != 0))}:
        problems.append(f"API key {key_id}: 0 requests in flight recorded but "
                        f"{in_flight[key_id]} open holds")
    stored_held = {(r.key_id, r.period, r.period_start_ms): r.held_nano for r in conn.execute(
        sa.select(key_spend).where(key_spend.c.held_nano != 0))}
    for where in sorted(stored_held.keys() | held.keys()):
        if stored_held.get(where, 0) != held.get(where, 0):
            problems.append(f"API key {where[0]}: {format_usd(stored_held.get(where, 0))} USD "
                            f"held in its {where[1]} from {where[2]} ms but its open holds "
                            f"there total {format_usd(held.get(where, 0))} USD")
