"""Promotional grant rows (``promo_grants``) and the wallet's promotional part."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import accounts
from tollway.store.tables import promo_grants as grants

#: Soonest expiry first; grants that never expire last; then oldest first.
_ORDER = (sa.case((grants.c.expires_at_ms.is_(None), 1), else_=0), grants.c.expires_at_ms,
          grants.c.id)


def insert(conn: Connection, *, account_id: int, amount_nano: int, reason: str, at_ms: int,
           expires_at_ms: int | None, entry_id: int) -> int:
    return int(conn.execute(grants.insert().values(
        account_id=account_id, amount_nano=amount_nano, remaining_nano=amount_nano,
        reason=reason, created_at_ms=at_ms, expires_at_ms=expires_at_ms,
        entry_id=entry_id).returning(grants.c.id)).scalar_one())


def by_entry(conn: Connection, entry_id: int) -> Any:
    return conn.execute(sa.select(grants).where(grants.c.entry_id == entry_id)).first()


def live(conn: Connection, account_id: int) -> list[Any]:
    """Grants with something left, in the order spending draws from them."""
    return list(conn.execute(sa.select(grants).where(
        grants.c.account_id == account_id, grants.c.closed_at_ms.is_(None)).order_by(*_ORDER)))


def all_of(conn: Connection, account_id: int) -> list[Any]:
    return list(conn.execute(sa.select(grants).where(grants.c.account_id == account_id)
                             .order_by(grants.c.id.desc())))


def promo(conn: Connection, account_id: int) -> tuple[int, int]:
    """(promo_nano, available + held) of the wallet, its row locked (PostgreSQL)."""
    row = conn.execute(sa.select(accounts.c.promo_nano,
                                 accounts.c.available_nano + accounts.c.held_nano)
                       .where(accounts.c.id == account_id).with_for_update()).one()
    return int(row[0]), int(row[1])


def set_promo(conn: Connection, account_id: int, promo_nano: int) -> None:
    conn.execute(accounts.update().where(accounts.c.id == account_id)
                 .values(promo_nano=promo_nano))


def set_remaining(conn: Connection, grant_id: int, remaining_nano: int, *,
                  closed_at_ms: int | None = None, expired_nano: int = 0) -> None:
    conn.execute(grants.update().where(grants.c.id == grant_id).values(
        remaining_nano=remaining_nano, closed_at_ms=closed_at_ms,
        expired_nano=grants.c.expired_nano + expired_nano))


def due_accounts(conn: Connection, at_ms: int, *, limit: int) -> list[int]:
    """Accounts with an open grant whose expiry has come."""
    return [int(r[0]) for r in conn.execute(
        sa.select(grants.c.account_id).where(grants.c.closed_at_ms.is_(None),
                                             grants.c.expires_at_ms <= at_ms)
        .group_by(grants.c.account_id).order_by(grants.c.account_id).limit(limit))]
