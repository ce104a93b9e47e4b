"""Taking back money that came in: a refunded or disputed payment.

The payment provider has already returned the money to the card holder, so the ledger must
book all of it; but the wallet may have spent part of it since. A reversal therefore takes
what it can from the available balance (never below zero: one guarded statement, as for a
hold) and books the rest on the write-off account, where the operator sees it::

    funding     +amount      (the money went back out the way it came in)
    wallet      -taken       (taken <= available)
    write-off   -(amount - taken)

Money held for requests in flight is left alone: those requests settle as usual. Like every
ledger operation it carries an idempotency key, stored in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.ledger import wallet_days
from tollway.ledger.ledger import (
    _AVAILABLE_FOR_UPDATE,
    _CREDIT,
    AVAILABLE,
    FUNDING,
    WRITEOFF,
    _amount,
    _conflict,
    _existing_entry,
    _post,
    _require_customer,
)
from tollway.ledger.low_balance import watch
from tollway.money import format_usd
from tollway.store.tables import postings


@dataclass(frozen=True, slots=True)
class Reversal:
    entry_id: int
    account_id: int
    amount_nano: int  # what the provider gave back to the payer
    taken_nano: int  # what the wallet had left of it
    written_off_nano: int  # the rest: booked on the write-off account
    balance_nano: int  # available balance right after


def reverse_topup(conn: Connection, account_id: int, amount_nano: int, *,
                  idempotency_key: str, at_ms: int, note: str | None = None) -> Reversal:
    """Take ``amount_nano`` back from the wallet, at most its available balance; the rest is
    written off. A repeat with the same key returns the first result and moves nothing."""
    _amount(amount_nano, "a reversal")
    key = f"reverse:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        if (row[1], row[2]) != (account_id, amount_nano):
            raise _conflict(idempotency_key, f"a reversal of {format_usd(row[2])} USD from "
                            f"account {row[1]}")
        return _repeat(conn, row)
    found = _AVAILABLE_FOR_UPDATE.one(conn, account_id=account_id)
    if found is None:
        _require_customer(conn, account_id)
    taken = min(amount_nano, int(found[0]))
    written_off = amount_nano - taken
    debited = _CREDIT.row(conn, account_id=account_id, amount=-taken)
    assert debited is not None  # the row is locked and taken <= available
    balance = int(debited[0])
    if taken:
        watch(conn, account_id, -taken, debited, at_ms=at_ms)
    wallet_days.count(conn, account_id, at_ms=at_ms, topups=-taken, written_off=written_off)
    entry_id = _post(conn, kind="reverse", account_id=account_id, amount_nano=amount_nano,
                     key=key, balance_after_nano=balance, note=note, at_ms=at_ms,
                     lines=[(FUNDING, AVAILABLE, amount_nano), (account_id, AVAILABLE, -taken),
                            (WRITEOFF, AVAILABLE, -written_off)])
    return Reversal(entry_id, account_id, amount_nano, taken, written_off, balance)


def _repeat(conn: Connection, row: Any) -> Reversal:
    entry_id, account_id, amount = int(row[0]), int(row[1]), int(row[2])
    taken = -int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(postings.c.amount_nano), 0))
                              .where(postings.c.entry_id == entry_id,
                                     postings.c.account_id == account_id)).scalar_one())
    return Reversal(entry_id, account_id, amount, taken, amount - taken,
                    int(row[4]))
