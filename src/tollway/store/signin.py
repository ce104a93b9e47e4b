"""Failed console sign-ins, counted per scope (``login:<login>``, ``ip:<address>``) in the
database so that every worker and instance sees the same counts."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import signin_failures


def recent_failures(conn: Connection, scopes: Iterable[str], *, since_ms: int,
                    limit: int) -> dict[str, list[int]]:
    """Each scope's failure times after ``since_ms``, newest first, at most ``limit`` each."""
    f = signin_failures.c
    found: dict[str, list[int]] = {}
    for scope in scopes:
        found[scope] = list(conn.execute(
            sa.select(f.at_ms).where(f.scope == scope, f.at_ms > since_ms)
            .order_by(f.at_ms.desc()).limit(limit)).scalars())
    return found


def clear_failures(conn: Connection, scope: str) -> None:
    conn.execute(signin_failures.delete().where(signin_failures.c.scope == scope))


def lock_scopes(conn: Connection, scopes: Iterable[str]) -> None:
    """Serialise attempts on the same scopes until this transaction ends. SQLite's write
    transactions are already serial (``BEGIN IMMEDIATE``); PostgreSQL takes a transaction
    advisory lock per scope, in sorted order (no deadlock between two scope sets)."""
    if conn.dialect.name != "postgresql":
        return
    for scope in sorted(set(scopes)):
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:s, 15))"),
                     {"s": scope})


def add_attempt(conn: Connection, scopes: Iterable[str], *, at_ms: int) -> list[int]:
    """One row per scope for an attempt in progress (a failure until it is withdrawn)."""
    return [int(conn.execute(signin_failures.insert().values(scope=scope, at_ms=at_ms)
                             .returning(signin_failures.c.id)).scalar_one())
            for scope in scopes]


def withdraw(conn: Connection, ids: Iterable[int]) -> None:
    ids = list(ids)
    if ids:
        conn.execute(signin_failures.delete().where(signin_failures.c.id.in_(ids)))


def forget(conn: Connection, *, before_ms: int, signup_before_ms: int) -> None:
    """Delete sign-in failures at or before ``before_ms`` and sign-up attempts (scopes
    ``signup:…``) at or before ``signup_before_ms``: they count for nothing any more."""
    f = signin_failures.c
    signup = f.scope.startswith("signup:")
    conn.execute(signin_failures.delete().where(sa.or_(
        sa.and_(f.at_ms <= before_ms, sa.not_(signup)),
        sa.and_(f.at_ms <= signup_before_ms, signup))))
