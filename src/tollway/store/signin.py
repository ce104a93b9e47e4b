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


def add_failures(conn: Connection, scopes: Iterable[str], *, at_ms: int,
                 forget_before_ms: int) -> None:
    """Record a failure for each scope, and forget failures older than ``forget_before_ms``
    (an indexed range delete: only what expired since the last failure)."""
    conn.execute(signin_failures.delete().where(signin_failures.c.at_ms <= forget_before_ms))
    rows = [{"scope": scope, "at_ms": at_ms} for scope in scopes]
    if rows:
        conn.execute(signin_failures.insert(), rows)


def clear_failures(conn: Connection, scope: str) -> None:
    conn.execute(signin_failures.delete().where(signin_failures.c.scope == scope))
