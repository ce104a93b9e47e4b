"""Rate-limit windows: a key's requests and tokens per fixed one-minute window, kept in the
database so that every worker and instance counts against the same numbers.

The admission is one guarded upsert in the hold's transaction (``… DO UPDATE … WHERE
requests + 1 <= :rpm AND tokens + :tokens <= :tpm``): no row back means "refuse", and
nothing was written. It is atomic for the same reasons as the balance guard (one writer on
SQLite; on PostgreSQL the conflicting row is locked and the WHERE re-checked).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from tollway.store.prepared import Prepared
from tollway.store.tables import rate_windows

_b = sa.bindparam


def _admit(dialect: str) -> sa.ClauseElement:
    insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
    stmt = insert(rate_windows).values(key_id=_b("key_id"), window_start_ms=_b("start"),
                                       requests=1, tokens=_b("tokens"))
    return stmt.on_conflict_do_update(
        index_elements=["key_id", "window_start_ms"],
        set_={"requests": rate_windows.c.requests + 1,
              "tokens": rate_windows.c.tokens + _b("tokens")},
        where=sa.and_(rate_windows.c.requests + 1 <= _b("rpm"),
                      rate_windows.c.tokens + _b("tokens") <= _b("tpm")),
    ).returning(rate_windows.c.requests, rate_windows.c.tokens)


_ADMIT = Prepared(_admit)
_WINDOW = Prepared(sa.select(rate_windows.c.requests, rate_windows.c.tokens)
                   .where(rate_windows.c.key_id == _b("key_id"),
                          rate_windows.c.window_start_ms == _b("start")))
_ADD_TOKENS = Prepared(
    rate_windows.update()
    .where(rate_windows.c.key_id == _b("key_id"), rate_windows.c.window_start_ms == _b("start"))
    .values(tokens=rate_windows.c.tokens + _b("delta")))
_PRUNE = Prepared(rate_windows.delete().where(rate_windows.c.window_start_ms < _b("before")))


def admit(conn: Connection, *, key_id: int, start_ms: int, tokens: int, rpm: int,
          tpm: int) -> tuple[int, int] | None:
    """Count one request of ``tokens`` in the window if it stays within both limits; returns
    the window's (requests, tokens) after it, or None (nothing counted)."""
    row: Any = _ADMIT.one(conn, key_id=key_id, start=start_ms, tokens=tokens, rpm=rpm, tpm=tpm)
    return None if row is None else (int(row[0]), int(row[1]))


def window(conn: Connection, *, key_id: int, start_ms: int) -> tuple[int, int]:
    row: Any = _WINDOW.one(conn, key_id=key_id, start=start_ms)
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def add_tokens(conn: Connection, *, key_id: int, start_ms: int, delta: int) -> None:
    if delta:
        _ADD_TOKENS.execute(conn, {"key_id": key_id, "start": start_ms, "delta": delta})


def prune(conn: Connection, *, before_ms: int) -> int:
    """Forget windows that ended before ``before_ms``."""
    return int(_PRUNE.execute(conn, {"before": before_ms}).rowcount)
