"""Web console sessions: rows keyed by the SHA-256 of the cookie's random id."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import accounts, web_sessions


@dataclass(frozen=True, slots=True)
class SessionRow:
    id_hash: str
    account_id: int | None
    operator: bool
    csrf_token: str
    expires_at_ms: int


def insert_session(conn: Connection, *, id_hash: str, account_id: int | None, operator: bool,
                   csrf_token: str, at_ms: int, expires_at_ms: int) -> None:
    # a sign-in is a good moment to forget sessions nobody can use any more
    conn.execute(web_sessions.delete().where(web_sessions.c.expires_at_ms <= at_ms))
    conn.execute(web_sessions.insert().values(
        id_hash=id_hash, account_id=account_id, operator=operator, csrf_token=csrf_token,
        created_at_ms=at_ms, expires_at_ms=expires_at_ms))


def live_session(conn: Connection, id_hash: str, *, now_ms: int) -> SessionRow | None:
    """The session with this id hash, unless it expired or its account is disabled."""
    s = web_sessions.c
    row = conn.execute(
        sa.select(s.id_hash, s.account_id, s.operator, s.csrf_token, s.expires_at_ms)
        .select_from(web_sessions.outerjoin(accounts, accounts.c.id == s.account_id))
        .where(s.id_hash == id_hash, s.expires_at_ms > now_ms,
               sa.or_(s.account_id.is_(None), accounts.c.disabled_at_ms.is_(None)))).first()
    if row is None:
        return None
    return SessionRow(row.id_hash, row.account_id, bool(row.operator), row.csrf_token,
                      row.expires_at_ms)


def delete_session(conn: Connection, id_hash: str) -> None:
    conn.execute(web_sessions.delete().where(web_sessions.c.id_hash == id_hash))


def delete_account_sessions(conn: Connection, account_id: int) -> None:
    conn.execute(web_sessions.delete().where(web_sessions.c.account_id == account_id))
