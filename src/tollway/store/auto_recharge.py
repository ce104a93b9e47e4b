"""Auto-recharge rows (``auto_recharge``, ``recharge_attempts``) and the guarded statements
that keep a saved card charged at most once at a time and credited at most once.

- :func:`start_attempt` inserts a ``pending`` attempt and claims the setting's
  ``in_flight_id`` with ``UPDATE … WHERE in_flight_id IS NULL``: zero rows means another
  charge is in flight, and the caller rolls back (the attempt row goes with it).
- :func:`succeed` moves an attempt to ``succeeded`` only from ``pending`` or ``failed`` (a
  charge the synchronous answer called failed may still be reported paid by Stripe's event):
  whichever of the API answer and the ``payment_intent.succeeded`` event comes second changes
  nothing, on SQLite (one writer) and on PostgreSQL (the second UPDATE waits for the first's
  row lock, then re-checks ``status``).

``accounts.recharge_threshold_nano`` mirrors the setting while it can run (enabled, not
paused, a card saved): the ledger reads it in the RETURNING of the statements that move the
money, so a request that does not cross it costs no extra statement (``ledger.low_balance``).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import accounts, auto_recharge, recharge_attempts

_ar, _at = auto_recharge, recharge_attempts


def get(conn: Connection, account_id: int) -> Any:
    return conn.execute(sa.select(_ar).where(_ar.c.account_id == account_id)).first()


def by_customer(conn: Connection, customer: str) -> Any:
    return conn.execute(sa.select(_ar).where(_ar.c.stripe_customer == customer)).first()


def save(conn: Connection, account_id: int, values: dict[str, Any], *, at_ms: int) -> Any:
    """Insert or update the setting with ``values`` (any column), then mirror it on the
    account (:func:`sync_account`)."""
    if get(conn, account_id) is None:
        conn.execute(_ar.insert().values(account_id=account_id, updated_at_ms=at_ms, **values))
    else:
        conn.execute(_ar.update().where(_ar.c.account_id == account_id)
                     .values(updated_at_ms=at_ms, **values))
    sync_account(conn, account_id)
    return get(conn, account_id)


def sync_account(conn: Connection, account_id: int) -> None:
    """Copy the threshold to the account while the setting can run (NULL otherwise), armed:
    saving a setting never charges a card by itself, the next debit below the threshold
    does (also for a wallet already below it, or one the monthly cap stopped)."""
    row = get(conn, account_id)
    runs = (row is not None and row.enabled and row.paused_at_ms is None
            and row.payment_method is not None and row.threshold_nano is not None)
    conn.execute(accounts.update().where(accounts.c.id == account_id).values(
        recharge_threshold_nano=row.threshold_nano if runs else None, recharge_armed=runs))


def set_armed(conn: Connection, account_id: int, armed: bool) -> None:
    conn.execute(accounts.update().where(accounts.c.id == account_id)
                 .values(recharge_armed=armed))


def available(conn: Connection, account_id: int) -> int:
    return int(conn.execute(sa.select(accounts.c.available_nano)
                            .where(accounts.c.id == account_id)).scalar_one())


def month_spent(conn: Connection, account_id: int, month_start_ms: int) -> int:
    """What the card was charged (or is being charged) in the cap's month."""
    return int(conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(_at.c.amount_nano), 0))
        .where(_at.c.account_id == account_id, _at.c.month_start_ms == month_start_ms,
               _at.c.status.in_(("pending", "succeeded")))).scalar_one())


def start_attempt(conn: Connection, account_id: int, amount_nano: int, *, currency: str,
                  month_start_ms: int, at_ms: int) -> int | None:
    """A pending attempt, owning the setting's in-flight slot; None if another holds it
    (nothing is left written: the caller's transaction must roll back the insert)."""
    attempt_id = int(conn.execute(_at.insert().values(
        account_id=account_id, amount_nano=amount_nano, currency=currency,
        month_start_ms=month_start_ms, status="pending", created_at_ms=at_ms)
        .returning(_at.c.id)).scalar_one())
    claimed = conn.execute(_ar.update().where(_ar.c.account_id == account_id,
                                              _ar.c.in_flight_id.is_(None))
                           .values(in_flight_id=attempt_id)).rowcount
    if not claimed:
        conn.execute(_at.delete().where(_at.c.id == attempt_id))
        return None
    return attempt_id


def resumable(conn: Connection, in_flight_id: int | None, *, stale_before_ms: int) -> Any:
    """The in-flight attempt to charge again under its own idempotency key, or None: one
    whose answer from Stripe was lost (:func:`mark_lost`), or one started before
    ``stale_before_ms`` whose answer was never booked (its process died). Stripe answers a
    repeated key with the first call's result, so a resumed charge charges the card at most
    once, whatever happened to the first call. ``in_flight_id``: the setting's slot, as
    the caller read it."""
    if in_flight_id is None:
        return None
    return conn.execute(sa.select(_at).where(
        _at.c.id == in_flight_id, _at.c.status == "pending",
        sa.or_(_at.c.error.is_not(None), _at.c.created_at_ms < stale_before_ms))).first()


def mark_lost(conn: Connection, attempt_id: int, *, error: str) -> None:
    """A pending attempt whose call got no answer: it keeps the in-flight slot (no other
    charge may start) until :func:`resumable` hands it out again."""
    conn.execute(_at.update().where(_at.c.id == attempt_id, _at.c.status == "pending")
                 .values(error=error))


def attempt(conn: Connection, attempt_id: int) -> Any:
    return conn.execute(sa.select(_at).where(_at.c.id == attempt_id)).first()


def set_payment_intent(conn: Connection, attempt_id: int, payment_intent: str) -> None:
    conn.execute(_at.update().where(_at.c.id == attempt_id, _at.c.payment_intent.is_(None))
                 .values(payment_intent=payment_intent))


def succeed(conn: Connection, attempt_id: int, *, payment_intent: str, at_ms: int) -> Any:
    """(account_id, amount_nano) if this call moved the attempt to ``succeeded``, else None;
    frees the in-flight slot and resets the failure count."""
    won = conn.execute(
        _at.update().where(_at.c.id == attempt_id, _at.c.status.in_(("pending", "failed")))
        .values(status="succeeded", payment_intent=payment_intent, completed_at_ms=at_ms,
                error=None)
        .returning(_at.c.account_id, _at.c.amount_nano)).first()
    if won is not None:
        conn.execute(_ar.update().where(_ar.c.account_id == won.account_id).values(
            failures=0, in_flight_id=sa.case((_ar.c.in_flight_id == attempt_id, None),
                                             else_=_ar.c.in_flight_id)))
    return won


def set_entry(conn: Connection, attempt_id: int, entry_id: int) -> None:
    conn.execute(_at.update().where(_at.c.id == attempt_id).values(entry_id=entry_id))


def fail(conn: Connection, attempt_id: int, *, error: str, at_ms: int) -> int | None:
    """Move a pending attempt to ``failed``, free the slot, count the failure; the account's
    consecutive failures after it, or None if the attempt was no longer pending."""
    row = conn.execute(_at.update().where(_at.c.id == attempt_id, _at.c.status == "pending")
                       .values(status="failed", error=error, completed_at_ms=at_ms)
                       .returning(_at.c.account_id)).first()
    if row is None:
        return None
    return int(conn.execute(
        _ar.update().where(_ar.c.account_id == row.account_id)
        .values(failures=_ar.c.failures + 1,
                in_flight_id=sa.case((_ar.c.in_flight_id == attempt_id, None),
                                     else_=_ar.c.in_flight_id))
        .returning(_ar.c.failures)).scalar_one())


def attempts(conn: Connection, account_id: int, *, limit: int) -> list[Any]:
    return list(conn.execute(sa.select(_at).where(_at.c.account_id == account_id)
                             .order_by(_at.c.id.desc()).limit(limit)).all())


def all_settings(conn: Connection) -> list[Any]:
    """Every account's setting (admin view)."""
    return list(conn.execute(sa.select(_ar).order_by(_ar.c.account_id)).all())
