"""Checkout orders and handled provider events (``payment_orders``, ``payment_events``).

The guarded UPDATEs here are what make a payment credit at most once under any concurrency,
in the same way as redemption codes (``store.codes``): :func:`mark_paid` changes an order
only while it is ``open``, and :func:`record_event` inserts a provider event id only if it
is new (``INSERT … ON CONFLICT DO NOTHING``). On SQLite writes are serialised; on PostgreSQL
at READ COMMITTED a second transaction waits for the first's row or index entry and then
sees it committed, so it changes nothing.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from tollway.store.tables import payment_events as events
from tollway.store.tables import payment_orders as orders

_MAX_ID = 2**63 - 1


def insert_order(conn: Connection, *, account_id: int, provider: str, amount_nano: int,
                 currency: str, at_ms: int) -> int:
    return int(conn.execute(orders.insert().values(
        account_id=account_id, provider=provider, amount_nano=amount_nano, currency=currency,
        status="open", created_at_ms=at_ms).returning(orders.c.id)).scalar_one())


def set_session(conn: Connection, order_id: int, session_id: str) -> None:
    conn.execute(orders.update().where(orders.c.id == order_id, orders.c.session_id.is_(None))
                 .values(session_id=session_id))


def get(conn: Connection, order_id: int) -> Any:
    if not 0 < order_id <= _MAX_ID:
        return None
    return conn.execute(sa.select(orders).where(orders.c.id == order_id)).first()


def by_session(conn: Connection, session_id: str) -> Any:
    return conn.execute(sa.select(orders).where(orders.c.session_id == session_id)).first()


def by_payment_intent(conn: Connection, payment_intent: str) -> Any:
    return conn.execute(sa.select(orders).where(orders.c.payment_intent == payment_intent)
                        .order_by(orders.c.id).limit(1)).first()


def mark_paid(conn: Connection, order_id: int, *, payment_intent: str | None,
              at_ms: int) -> Any:
    """(account_id, amount_nano) if this call moved the order from open to paid, else None."""
    return conn.execute(
        orders.update().where(orders.c.id == order_id, orders.c.status == "open")
        .values(status="paid", payment_intent=payment_intent, paid_at_ms=at_ms)
        .returning(orders.c.account_id, orders.c.amount_nano)).first()


def set_entry(conn: Connection, order_id: int, entry_id: int) -> None:
    conn.execute(orders.update().where(orders.c.id == order_id).values(entry_id=entry_id))


def mark_closed(conn: Connection, order_id: int, status: str) -> int:
    """An open order that will never be paid (``expired`` or ``failed``); rows changed."""
    return int(conn.execute(orders.update().where(orders.c.id == order_id,
                                                  orders.c.status == "open")
                            .values(status=status)).rowcount)


def claim_reversal(conn: Connection, order_id: int, *, refunded_nano: int | None = None,
                   disputed_nano: int | None = None) -> Any:
    """Raise the order's refunded or disputed total to the given value (never lower it) and
    return (account_id, amount_nano, refunded, disputed, reversed) after, with the row locked
    until the transaction ends. None if the order is not paid."""
    values: dict[str, Any] = {}
    if refunded_nano is not None:
        values["refunded_nano"] = sa.case((orders.c.refunded_nano < refunded_nano,
                                           refunded_nano), else_=orders.c.refunded_nano)
    if disputed_nano is not None:
        values["disputed_nano"] = sa.case((orders.c.disputed_nano < disputed_nano,
                                           disputed_nano), else_=orders.c.disputed_nano)
    return conn.execute(
        orders.update().where(orders.c.id == order_id, orders.c.status == "paid")
        .values(values)
        .returning(orders.c.account_id, orders.c.amount_nano, orders.c.refunded_nano,
                   orders.c.disputed_nano, orders.c.reversed_nano)).first()


def add_reversal(conn: Connection, order_id: int, *, reversed_nano: int,
                 written_off_nano: int) -> None:
    conn.execute(orders.update().where(orders.c.id == order_id).values(
        reversed_nano=orders.c.reversed_nano + reversed_nano,
        written_off_nano=orders.c.written_off_nano + written_off_nano))


def record_event(conn: Connection, *, event_id: str, type_: str, order_id: int | None,
                 outcome: str, at_ms: int) -> bool:
    """Remember a provider event; False if it was already recorded (a replay)."""
    insert = sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert
    stmt = insert(events).values(event_id=event_id, type=type_, order_id=order_id,
                                 outcome=outcome, received_at_ms=at_ms)
    done = conn.execute(stmt.on_conflict_do_nothing(index_elements=["event_id"])
                        .returning(events.c.event_id)).first()
    return done is not None


def set_event_outcome(conn: Connection, event_id: str, outcome: str,
                      order_id: int | None) -> None:
    conn.execute(events.update().where(events.c.event_id == event_id)
                 .values(outcome=outcome, order_id=order_id))


def event(conn: Connection, event_id: str) -> Any:
    return conn.execute(sa.select(events).where(events.c.event_id == event_id)).first()


def page(conn: Connection, account_id: int, *, limit: int,
         before_id: int | None = None) -> list[Any]:
    """An account's orders, newest first."""
    query = sa.select(orders).where(orders.c.account_id == account_id)
    if before_id is not None:
        query = query.where(orders.c.id < before_id)
    return list(conn.execute(query.order_by(orders.c.id.desc()).limit(limit)).all())
