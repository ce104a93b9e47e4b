"""The low-balance watch: a wallet with a threshold is watched by the statements that change
its available balance (they return it with the threshold and its armed flag: no extra query),
and a crossing queues a ``balance.low`` event in the same transaction (the transactional
outbox, delivered by ``notify``). Auto-recharge is watched the same way, with its own
threshold and armed flag: a debit below it queues one ``auto_recharge.due`` event whose only
delivery is the charge of the saved card (``billing.auto_recharge``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from tollway.money import format_usd
from tollway.store import notifications
from tollway.store.tables import accounts

#: What a statement that changes a wallet's available balance returns for :func:`watch`.
WATCHED = (accounts.c.available_nano, accounts.c.low_balance_nano,
           accounts.c.low_balance_armed, accounts.c.recharge_threshold_nano,
           accounts.c.recharge_armed)


def watch(conn: Connection, account_id: int, delta_nano: int, row: Any, *, at_ms: int) -> None:
    """Low-balance alert, checked on every change of a wallet's available balance by
    ``delta_nano``; ``row`` is what the statement returned (:data:`WATCHED`, by name).

    A debit that takes an armed wallet from >= threshold to below it queues one
    ``balance.low`` event (in this transaction: the outbox) and disarms; money coming in
    (a top-up, a redemption, a positive adjustment) that brings it back to >= threshold
    re-arms. Released holds do not re-arm, so a wallet hovering at the threshold with large
    worst-case holds is not alerted once per request. Without a threshold this is one test.
    """
    if row.recharge_threshold_nano is not None:
        _recharge(conn, account_id, delta_nano, row, at_ms=at_ms)
    threshold = row.low_balance_nano
    if threshold is None:
        return
    after, armed = int(row.available_nano), row.low_balance_armed
    if delta_nano < 0 and armed and after < threshold <= after - delta_nano:
        notifications.balance_low(conn, account_id, at_ms=at_ms, data={
            "available_usd": format_usd(after), "threshold_usd": format_usd(int(threshold))})
    elif delta_nano > 0 and not armed and after >= threshold:
        notifications.set_armed(conn, account_id, True)


def _recharge(conn: Connection, account_id: int, delta_nano: int, row: Any, *,
              at_ms: int) -> None:
    """Auto-recharge: an armed wallet debited to below its recharge threshold disarms and
    queues one ``auto_recharge.due`` (in this transaction). Unlike the alert, being below
    is enough (not only crossing): after a failed charge the setting re-arms, and the next
    debit tries again until the failures pause it. Money coming in that brings the wallet
    back to the threshold re-arms it; one charge in flight at a time is guarded again where
    it is made."""
    threshold, after = int(row.recharge_threshold_nano), int(row.available_nano)
    if delta_nano < 0 and row.recharge_armed and after < threshold:
        notifications.recharge_due(conn, account_id, at_ms=at_ms, data={
            "available_usd": format_usd(after), "threshold_usd": format_usd(threshold)})
    elif delta_nano > 0 and not row.recharge_armed and after >= threshold:
        notifications.set_recharge_armed(conn, account_id, True)
