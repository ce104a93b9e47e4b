"""Redemption code rows. Only a code's SHA-256 is stored; the guarded UPDATE in
:func:`mark_redeemed` is what makes a code credit at most once under any concurrency (the
second redeemer finds ``redeemed_at_ms`` set: on SQLite because writes are serialised, on
PostgreSQL because READ COMMITTED re-checks the WHERE clause after the first commit)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import redemption_codes as codes

_MAX_ID = 2**63 - 1  # no id column holds more (a larger one is an unknown code, not a crash)


def insert(conn: Connection, *, code_hash: str, hint: str, amount_nano: int,
           note: str | None, at_ms: int, expires_at_ms: int | None,
           credit_days: int | None = None) -> int:
    return int(conn.execute(codes.insert().values(
        code_hash=code_hash, hint=hint, amount_nano=amount_nano, note=note, created_at_ms=at_ms,
        expires_at_ms=expires_at_ms, credit_days=credit_days).returning(codes.c.id))
        .scalar_one())


def find(conn: Connection, code_hash: str) -> Any:
    return conn.execute(sa.select(codes).where(codes.c.code_hash == code_hash)).first()


def get(conn: Connection, code_id: int) -> Any:
    if not 0 < code_id <= _MAX_ID:
        return None
    return conn.execute(sa.select(codes).where(codes.c.id == code_id)).first()


def mark_redeemed(conn: Connection, code_hash: str, account_id: int, at_ms: int) -> Any:
    """(id, amount_nano, credit_days) if this call redeemed the code, None if it was not
    redeemable."""
    return conn.execute(
        codes.update()
        .where(codes.c.code_hash == code_hash, codes.c.redeemed_at_ms.is_(None),
               codes.c.revoked_at_ms.is_(None),
               sa.or_(codes.c.expires_at_ms.is_(None), codes.c.expires_at_ms > at_ms))
        .values(redeemed_by=account_id, redeemed_at_ms=at_ms)
        .returning(codes.c.id, codes.c.amount_nano, codes.c.credit_days)).first()


def set_entry(conn: Connection, code_id: int, entry_id: int) -> None:
    conn.execute(codes.update().where(codes.c.id == code_id).values(entry_id=entry_id))


def revoke(conn: Connection, code_id: int, at_ms: int) -> int:
    """Revoke an unredeemed code; the number of rows changed (0: unknown or used)."""
    if not 0 < code_id <= _MAX_ID:
        return 0
    return int(conn.execute(codes.update().where(
        codes.c.id == code_id, codes.c.redeemed_at_ms.is_(None),
        codes.c.revoked_at_ms.is_(None)).values(revoked_at_ms=at_ms)).rowcount)


def page(conn: Connection, *, limit: int, before_id: int | None = None,
         status: str | None = None, now_ms: int) -> list[Any]:
    """Codes newest first; ``status``: unused, redeemed, expired or revoked."""
    query = sa.select(codes)
    if before_id is not None:
        query = query.where(codes.c.id < before_id)
    live = sa.and_(codes.c.redeemed_at_ms.is_(None), codes.c.revoked_at_ms.is_(None))
    if status == "redeemed":
        query = query.where(codes.c.redeemed_at_ms.is_not(None))
    elif status == "revoked":
        query = query.where(codes.c.revoked_at_ms.is_not(None))
    elif status == "expired":
        query = query.where(live, codes.c.expires_at_ms <= now_ms)
    elif status == "unused":
        query = query.where(live, sa.or_(codes.c.expires_at_ms.is_(None),
                                         codes.c.expires_at_ms > now_ms))
    return list(conn.execute(query.order_by(codes.c.id.desc()).limit(limit)).all())
