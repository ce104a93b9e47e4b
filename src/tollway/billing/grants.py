"""Promotional credit: grants with an amount, a reason and an optional expiry.

Design, given that the request path must stay as cheap as it is:

- The wallet keeps one number more, ``accounts.promo_nano``: how much of its total
  (available + held) is promotional. Spending draws from it first, in the settlement's
  existing ``UPDATE`` (a column expression: ``promo = max(promo - paid, 0)``). An account
  without grants therefore costs **zero** extra statements per request, and so does one with
  grants; holds, voids and the reaper do not touch it.
- Which grant the spending came from (soonest expiry first, never-expiring last) is derived
  when it matters — before a grant is added, before grants expire, and when they are shown —
  by :func:`reconcile`: the grants' remaining amounts must add up to ``promo_nano``, and the
  difference is what was spent, taken from the front of that order. Because the order of the
  open grants only changes at those moments, deriving it later gives exactly what burning
  each grant on every request would have.
- Expiry (:func:`expire_due`, run by the server's reaper and ``tollway grants expire``) first
  reconciles, then moves each expired grant's remainder out of the wallet through the ledger
  (``ledger.grants.expire``): at most what is available, never below zero.
- The balance shows ``promotional_usd`` = min(promo, available) and ``paid_usd`` = the rest of
  the available balance. A debit that is not spending (a negative adjustment, a refund) may
  leave ``promo_nano`` above the wallet's total for a while; it is clamped at the next
  reconcile.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from tollway.billing.views import iso
from tollway.errors import InvalidRequest
from tollway.ledger import grants as ledger_grants
from tollway.money import format_usd
from tollway.store import grants as store
from tollway.store import notifications
from tollway.store import usage as usage_store
from tollway.store.accounts import find_account

MAX_REASON = 500
DAY_MS = 86_400_000


def reconcile(conn: Connection, account_id: int, *, at_ms: int) -> list[Any]:
    """Bring each open grant's remaining amount in line with the wallet's promotional part
    (spending burnt the soonest-expiring first); returns the open grants, in that order,
    with their remaining amounts as now stored (as dicts)."""
    promo, total = store.promo(conn, account_id)
    if promo > total:
        promo = total
        store.set_promo(conn, account_id, promo)
    rows = store.live(conn, account_id)
    spent = sum(int(r.remaining_nano) for r in rows) - promo
    result = []
    for row in rows:
        remaining = int(row.remaining_nano)
        burn = min(max(spent, 0), remaining)
        spent -= burn
        if burn:
            remaining -= burn
            store.set_remaining(conn, row.id, remaining,
                                closed_at_ms=at_ms if remaining == 0 else None)
        if remaining:
            result.append({**row._asdict(), "remaining_nano": remaining})
    return result


def add(conn: Connection, account_ref: str | int, amount_nano: int, *, reason: str,
        expires_at_ms: int | None, at_ms: int, idempotency_key: str) -> dict[str, Any]:
    """An operator's grant, as the API shows it."""
    row, available_nano = give(conn, account_ref, amount_nano, reason=reason,
                               expires_at_ms=expires_at_ms, at_ms=at_ms,
                               idempotency_key=idempotency_key)
    return _view(row, available_nano)


def give(conn: Connection, account_ref: str | int, amount_nano: int, *, reason: str,
         expires_at_ms: int | None, at_ms: int, idempotency_key: str,
         source: str | None = None) -> tuple[Any, int]:
    """Grant promotional credit (once per ``idempotency_key``): the grant's row and the
    account's available balance right after. ``source`` (``signup``, ``redemption``) also
    queues a ``balance.topup`` notification saying where it came from; operator grants queue
    none."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise InvalidRequest(f"a grant needs a reason of 1 to {MAX_REASON} characters")
    if expires_at_ms is not None and expires_at_ms <= at_ms:
        raise InvalidRequest("a grant's expiry must be in the future")
    account = find_account(conn, account_ref)
    reconcile(conn, account.id, at_ms=at_ms)  # earlier spending stays with earlier grants
    note = f"promotional credit: {reason.strip()}"
    move = ledger_grants.grant(conn, account.id, amount_nano, idempotency_key=idempotency_key,
                               at_ms=at_ms, note=note)
    if (earlier := store.by_entry(conn, move.entry_id)) is not None:  # a repeated key
        return earlier, move.balance_nano
    store.insert(conn, account_id=account.id, amount_nano=amount_nano, reason=reason.strip(),
                 at_ms=at_ms, expires_at_ms=expires_at_ms, entry_id=move.entry_id)
    usage_store.insert_event(conn, event_id=f"entry-{move.entry_id}", account_id=account.id,
                             type_="adjustment", at_ms=at_ms, credit_nano=amount_nano,
                             note=note)
    if source is not None:
        notifications.enqueue(conn, account.id, "balance.topup", {
            "amount_usd": format_usd(amount_nano),
            "available_usd": format_usd(move.balance_nano), "source": source,
            "promotional": True, "expires_at": iso(expires_at_ms),
            "entry_id": move.entry_id}, at_ms=at_ms, dedupe_key=f"topup:{move.entry_id}")
    return store.by_entry(conn, move.entry_id), move.balance_nano


def signup_credit(conn: Connection, account_id: int, amount_nano: int, *, days: int,
                  at_ms: int) -> tuple[Any, int]:
    """The credit an account created at /signup gets, once (``days``: 0 for ever)."""
    return give(conn, account_id, amount_nano, reason="sign-up credit",
                expires_at_ms=at_ms + days * DAY_MS if days else None, at_ms=at_ms,
                idempotency_key=f"signup-credit-{account_id}", source="signup")


def _view(row: Any, available_nano: int) -> dict[str, Any]:
    return {"object": "grant", "id": row.id, "account_id": row.account_id,
            "amount_usd": format_usd(row.amount_nano), "reason": row.reason,
            "expires_at": iso(row.expires_at_ms), "entry_id": row.entry_id,
            "available_usd": format_usd(available_nano)}


def expire_account(conn: Connection, account_id: int, *, at_ms: int) -> int:
    """Take out what the account's expired grants have left; returns the nano-USD taken."""
    taken_total = 0
    for row in reconcile(conn, account_id, at_ms=at_ms):
        if row["expires_at_ms"] is None or row["expires_at_ms"] > at_ms:
            continue
        remaining = int(row["remaining_nano"])
        move = ledger_grants.expire(conn, account_id, remaining,
                                    idempotency_key=f"{row['id']}:{remaining}", at_ms=at_ms,
                                    note=f"promotional credit expired (grant {row['id']})")
        left = remaining - move.amount_nano
        store.set_remaining(conn, row["id"], left, closed_at_ms=at_ms if left == 0 else None,
                            expired_nano=move.amount_nano)
        if move.amount_nano:
            usage_store.insert_event(conn, event_id=f"entry-{move.entry_id}",
                                     account_id=account_id, type_="adjustment", at_ms=at_ms,
                                     credit_nano=-move.amount_nano,
                                     note=f"promotional credit expired (grant {row['id']})")
        taken_total += move.amount_nano
    return taken_total


def expire_due(conn: Connection, *, at_ms: int, limit: int = 500) -> int:
    """Expire every grant whose time has come (the reaper); the nano-USD taken back."""
    return sum(expire_account(conn, a, at_ms=at_ms)
               for a in store.due_accounts(conn, at_ms, limit=limit))


def listing(conn: Connection, account_ref: str | int, *, at_ms: int) -> dict[str, Any]:
    """Every grant of the account, newest first, with what each has left."""
    account = find_account(conn, account_ref)
    reconcile(conn, account.id, at_ms=at_ms)
    return {"object": "list", "account_id": account.id, "data": [{
        "id": r.id, "amount_usd": format_usd(r.amount_nano),
        "remaining_usd": format_usd(r.remaining_nano),
        "expired_usd": format_usd(r.expired_nano), "reason": r.reason,
        "created_at": iso(r.created_at_ms), "expires_at": iso(r.expires_at_ms),
        "closed_at": iso(r.closed_at_ms)} for r in store.all_of(conn, account.id)]}
