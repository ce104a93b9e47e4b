"""Money in: top-ups and operator adjustments, each moved by the ledger and written to the
account's log in the same transaction (a repeated idempotency key writes neither twice). A
top-up may also move the account up a tier (``billing.tiers``), in the same transaction."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from tollway.billing import tiers
from tollway.ledger import ledger
from tollway.ledger.ledger import Adjustment, Topup
from tollway.money import format_usd
from tollway.store import notifications
from tollway.store import usage as usage_store
from tollway.store.accounts import Account, find_account


def topup(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
          at_ms: int, note: str | None = None, source: str = "topup") -> Topup:
    """A top-up (``source`` says how it came: ``topup`` or ``redemption``), its line in the
    account's log and its ``balance.topup`` notification, all in the caller's transaction and
    stamped ``at_ms``."""
    result = ledger.topup(conn, account_id, amount_nano, idempotency_key=idempotency_key,
                          note=note, at_ms=at_ms)
    at = at_ms
    usage_store.insert_event(conn, event_id=f"entry-{result.entry_id}", account_id=account_id,
                             type_="topup", at_ms=at, credit_nano=amount_nano, note=note)
    notifications.enqueue(conn, account_id, "balance.topup", {
        "amount_usd": format_usd(amount_nano), "available_usd": format_usd(result.balance_nano),
        "source": source, "entry_id": result.entry_id}, at_ms=at,
        dedupe_key=f"topup:{result.entry_id}")
    tiers.upgrade_after_topup(conn, account_id)
    return result


def adjust(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
           at_ms: int, note: str | None = None) -> Adjustment:
    result = ledger.adjust(conn, account_id, amount_nano, idempotency_key=idempotency_key,
                           note=note, at_ms=at_ms)
    usage_store.insert_event(conn, event_id=f"entry-{result.entry_id}", account_id=account_id,
                             type_="adjustment", at_ms=at_ms,
                             credit_nano=amount_nano, note=note)
    return result


def credit(conn: Connection, account_ref: str | int, amount_nano: int, *, kind: str,
           idempotency_key: str, note: str | None, at_ms: int
           ) -> tuple[Account, Topup | Adjustment]:
    """A top-up (``kind="topup"``) or an adjustment to the account with this id or name."""
    account = find_account(conn, account_ref)
    move = topup if kind == "topup" else adjust
    return account, move(conn, account.id, amount_nano, idempotency_key=idempotency_key,
                         note=note, at_ms=at_ms)
