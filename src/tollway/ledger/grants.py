"""Promotional credit in the ledger: granting it, and taking back what expired.

A grant is money from the adjustments account into the wallet, like an operator credit, and
it also raises the wallet's ``promo_nano``: the promotional part of the wallet's total
(available + held). Spending takes from that part first. The settlement does it in its own
``UPDATE`` as a column expression (``ledger._SETTLE_ACCOUNT``:
``promo = max(promo - paid, 0)``), so a settlement costs the same statements with or without
grants, and an account without grants pays for one arithmetic expression on a zero.

What expires leaves through the ledger too (wallet → adjustments), at most what is available:
money held for requests in flight is not touched (the grant keeps it and the next sweep takes
what is left). Neither moves ``promo_nano`` below zero or above the wallet's total.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.ledger import wallet_days
from tollway.ledger.ledger import (
    _AVAILABLE_FOR_UPDATE,
    _CREDIT,
    ADJUSTMENTS,
    AVAILABLE,
    _amount,
    _conflict,
    _existing_entry,
    _post,
    _require_customer,
)
from tollway.ledger.low_balance import watch
from tollway.money import format_usd
from tollway.store.tables import accounts, postings


@dataclass(frozen=True, slots=True)
class PromoMove:
    entry_id: int
    account_id: int
    amount_nano: int  # granted, or taken back
    balance_nano: int  # available right after


def _promo(conn: Connection, account_id: int, delta_nano: int) -> None:
    """Move the promotional part by ``delta_nano``, kept within 0 and the wallet's total."""
    promo = accounts.c.promo_nano + delta_nano
    total = accounts.c.available_nano + accounts.c.held_nano
    conn.execute(accounts.update().where(accounts.c.id == account_id).values(
        promo_nano=sa.case((promo < 0, 0), (promo > total, total), else_=promo)))


def grant(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
          at_ms: int, note: str | None = None) -> PromoMove:
    _amount(amount_nano, "a grant")
    key = f"grant:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        if (row[1], row[2]) != (account_id, amount_nano):
            raise _conflict(idempotency_key, f"a grant of {format_usd(row[2])} USD to account "
                            f"{row[1]}")
        return PromoMove(row[0], row[1], row[2], row[4])
    credited = _CREDIT.row(conn, account_id=account_id, amount=amount_nano)
    if credited is None:
        _require_customer(conn, account_id)
    balance = int(credited[0])
    watch(conn, account_id, amount_nano, credited, at_ms=at_ms)
    _promo(conn, account_id, amount_nano)
    wallet_days.count(conn, account_id, at_ms=at_ms, grants=amount_nano)
    entry_id = _post(conn, kind="grant", account_id=account_id, amount_nano=amount_nano,
                     key=key, balance_after_nano=balance, note=note, at_ms=at_ms,
                     lines=[(ADJUSTMENTS, AVAILABLE, -amount_nano),
                            (account_id, AVAILABLE, amount_nano)])
    return PromoMove(entry_id, account_id, amount_nano, balance)


def expire(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
           at_ms: int, note: str | None = None) -> PromoMove:
    """Take back up to ``amount_nano`` of expired promotional credit: at most what is
    available. Returns what was taken (possibly 0)."""
    _amount(amount_nano, "an expiry")
    key = f"grant-expire:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        taken = -int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(
            postings.c.amount_nano), 0)).where(postings.c.entry_id == row[0],
                                              postings.c.account_id == account_id)).scalar_one())
        return PromoMove(row[0], row[1], taken, row[4])
    found = _AVAILABLE_FOR_UPDATE.one(conn, account_id=account_id)
    if found is None:
        _require_customer(conn, account_id)
    taken = min(amount_nano, int(found[0]))
    debited = _CREDIT.row(conn, account_id=account_id, amount=-taken)
    balance = int(debited[0])
    if taken:
        watch(conn, account_id, -taken, debited, at_ms=at_ms)
        _promo(conn, account_id, -taken)
        wallet_days.count(conn, account_id, at_ms=at_ms, grants_expired=taken)
    entry_id = _post(conn, kind="grant_expire", account_id=account_id, amount_nano=taken,
                     key=key, balance_after_nano=balance, note=note, at_ms=at_ms,
                     lines=[(account_id, AVAILABLE, -taken), (ADJUSTMENTS, AVAILABLE, taken)])
    return PromoMove(entry_id, account_id, taken, balance)
