"""Redemption codes: operators mint them worth a USD amount; a customer redeems one once.

What a code credits is promotional credit (a grant, ``billing.grants``: spent before paid
money), with the reason "redemption code …XXXX" (its last four symbols only) and, when the
code was minted with ``credit_days``, an expiry that many days after the redemption.

A code is ``TW-XXXX-XXXX-XXXX-XXXX``: 16 symbols of Crockford's base-32 alphabet (no I, L, O,
U; typing those is forgiven as 1, 1, 0) drawn by :mod:`secrets`, 80 bits. Only its SHA-256 is
stored. Redeeming marks the code used with one guarded UPDATE and books the grant (idempotency
key ``grant:redeem:<code id>``) in the same transaction, so the credit lands exactly once
however many sessions redeem the same code at the same moment.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from tollway.billing import grants
from tollway.billing.views import iso
from tollway.errors import (
    CodeExpired,
    CodeRedeemed,
    CodeRevoked,
    InvalidRequest,
    UnknownCode,
)
from tollway.money import format_usd
from tollway.store import codes as store

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FORGIVEN = str.maketrans({"O": "0", "I": "1", "L": "1"})
SYMBOLS = 16  # x 5 bits = 80 bits
MAX_BATCH = 10_000
MAX_CREDIT_DAYS = 3650
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class NewCode:
    id: int
    code: str  # shown once: only its hash is kept
    amount_nano: int
    expires_at_ms: int | None
    note: str | None
    credit_days: int | None = None  # how long the credit stays valid once redeemed


@dataclass(frozen=True, slots=True)
class Redemption:
    code_id: int
    account_id: int
    amount_nano: int
    entry_id: int
    available_nano: int  # the account's available balance right after
    grant_id: int = 0
    credit_expires_at_ms: int | None = None  # when the promotional credit expires


def generate() -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(SYMBOLS))
    return "TW-" + "-".join(body[i:i + 4] for i in range(0, SYMBOLS, 4))


def _canonical(code: str) -> str | None:
    """The 16 symbols of a code as typed (any case, dashes, spaces, the TW- prefix optional),
    or None if it cannot be one."""
    text = "".join(code.split()).replace("-", "").upper().translate(_FORGIVEN)
    if len(text) == SYMBOLS + 2 and text.startswith("TW"):
        text = text[2:]
    if len(text) != SYMBOLS or any(ch not in ALPHABET for ch in text):
        return None
    return text


def _hash(canonical: str) -> str:
    return hashlib.sha256(canonical.encode()).hexdigest()


def mint(conn: Connection, amount_nano: int, *, count: int = 1, at_ms: int,
         expires_at_ms: int | None = None, note: str | None = None,
         credit_days: int | None = None) -> list[NewCode]:
    """``expires_at_ms``: when the code can no longer be redeemed; ``credit_days``: how long
    the credit it grants stays valid after a redemption (None: for ever)."""
    if not 1 <= count <= MAX_BATCH:
        raise InvalidRequest(f"count must be from 1 to {MAX_BATCH}")
    if credit_days is not None and (isinstance(credit_days, bool)
                                    or not isinstance(credit_days, int)
                                    or not 1 <= credit_days <= MAX_CREDIT_DAYS):
        raise InvalidRequest(f"the credit's validity must be a whole number of days from 1 "
                             f"to {MAX_CREDIT_DAYS}")
    if expires_at_ms is not None and expires_at_ms <= at_ms:
        raise InvalidRequest("the expiry must be in the future")
    minted = []
    for _ in range(count):
        code = generate()
        canonical = _canonical(code)
        assert canonical is not None
        code_id = store.insert(conn, code_hash=_hash(canonical), hint=canonical[-4:],
                               amount_nano=amount_nano, note=note, at_ms=at_ms,
                               expires_at_ms=expires_at_ms, credit_days=credit_days)
        minted.append(NewCode(code_id, code, amount_nano, expires_at_ms, note, credit_days))
    return minted


def redeem(conn: Connection, account_id: int, code: str, now_ms: int) -> Redemption:
    """Grant the code's amount to the account as promotional credit, once; raise
    UnknownCode, CodeRedeemed, CodeExpired or CodeRevoked otherwise (nothing is written
    then)."""
    canonical = _canonical(code) if isinstance(code, str) else None
    if canonical is None:
        raise UnknownCode("this is not a valid redemption code")
    code_hash = _hash(canonical)
    won = store.mark_redeemed(conn, code_hash, account_id, now_ms)
    if won is None:
        row = store.find(conn, code_hash)
        if row is None:
            raise UnknownCode("this is not a valid redemption code")
        if row.redeemed_at_ms is not None:
            raise CodeRedeemed(f"this code was already redeemed at {iso(row.redeemed_at_ms)}")
        if row.revoked_at_ms is not None:
            raise CodeRevoked("this code was revoked by the operator")
        raise CodeExpired(f"this code expired at {iso(row.expires_at_ms)}")
    code_id, amount, days = int(won[0]), int(won[1]), won[2]
    expires = None if days is None else now_ms + int(days) * DAY_MS
    row, available = grants.give(conn, account_id, amount,
                                 reason=f"redemption code …{canonical[-4:]}",
                                 expires_at_ms=expires, at_ms=now_ms,
                                 idempotency_key=f"redeem:{code_id}", source="redemption")
    store.set_entry(conn, code_id, row.entry_id)
    return Redemption(code_id, account_id, amount, row.entry_id, available, row.id, expires)


def revoke(conn: Connection, code_id: int, *, at_ms: int) -> dict[str, Any]:
    if store.revoke(conn, code_id, at_ms) != 1:
        row = store.get(conn, code_id)
        if row is None:
            raise UnknownCode(f"no redemption code with id {code_id}")
        raise InvalidRequest(f"code {code_id} is already "
                             f"{'redeemed' if row.redeemed_at_ms is not None else 'revoked'}")
    return code_view(store.get(conn, code_id))


def new_code_view(new: NewCode) -> dict[str, Any]:
    return {"id": new.id, "code": new.code, "amount_usd": format_usd(new.amount_nano),
            "expires_at": iso(new.expires_at_ms), "credit_expires_days": new.credit_days,
            "note": new.note}


def code_view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "hint": f"TW-…-{row.hint}", "amount_usd": format_usd(row.amount_nano),
            "note": row.note, "created_at": iso(row.created_at_ms),
            "expires_at": iso(row.expires_at_ms), "credit_expires_days": row.credit_days,
            "revoked_at": iso(row.revoked_at_ms),
            "redeemed_by": row.redeemed_by, "redeemed_at": iso(row.redeemed_at_ms),
            "entry_id": row.entry_id}


def redemption_view(r: Redemption) -> dict[str, Any]:
    return {"object": "redemption", "code_id": r.code_id, "account_id": r.account_id,
            "amount_usd": format_usd(r.amount_nano), "entry_id": r.entry_id,
            "grant_id": r.grant_id, "promotional": True,
            "credit_expires_at": iso(r.credit_expires_at_ms),
            "available_usd": format_usd(r.available_nano)}


def page(conn: Connection, *, limit: int, cursor: int | None, status: str | None,
         now_ms: int) -> dict[str, Any]:
    if status not in (None, "unused", "redeemed", "expired", "revoked"):
        raise InvalidRequest("status must be unused, redeemed, expired or revoked")
    rows = store.page(conn, limit=limit + 1, before_id=cursor, status=status, now_ms=now_ms)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"object": "list", "data": [code_view(r) for r in rows],
            "next_cursor": str(rows[-1].id) if more else None, "has_more": more}
