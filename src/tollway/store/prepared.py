"""Statements on the money hot path: written once as SQLAlchemy Core, compiled once per
dialect, executed straight on the DBAPI cursor of the current transaction.

SQLAlchemy's per-execution work (coercion, cache keys, result processing) costs about 20 µs a
statement, several times the cost of the statement itself on SQLite; a hold plus its
settlement is a dozen statements. The columns these statements touch are integers and
strings, which need no type processing, so skipping that layer changes nothing but speed.
Engine event listeners (``before_cursor_execute``/``after_cursor_execute``) still see these
statements: the statement-budget tests count them that way.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ClauseElement

from tollway.store.db import execute_raw

_DIALECTS = {"sqlite": sqlite.dialect(paramstyle="named"),
             "postgresql": postgresql.psycopg.dialect()}  # type: ignore[no-untyped-call]


class Prepared:
    """``statement`` is a Core statement, or a function of the dialect name that builds one
    (for dialect-specific syntax such as ``INSERT … ON CONFLICT``)."""

    def __init__(self, statement: ClauseElement | Callable[[str], ClauseElement]) -> None:
        self.statement = statement
        self._compiled: dict[str, tuple[str, dict[str, Any]]] = {}
        self._row_type: Any = None

    def _for(self, dialect: str) -> tuple[str, dict[str, Any]]:
        """The SQL text and the constants the statement binds (``status = 'open'``)."""
        found = self._compiled.get(dialect)
        if found is None:
            statement = (self.statement if isinstance(self.statement, ClauseElement)
                         else self.statement(dialect))
            compiled = statement.compile(dialect=_DIALECTS[dialect])
            constants = {k: v for k, v in compiled.params.items() if v is not None}
            found = self._compiled[dialect] = (str(compiled), constants)
        return found

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """Run on the connection's DBAPI cursor; returns the cursor (fetchone, rowcount)."""
        sql, constants = self._for(conn.dialect.name)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        execute_raw(conn, cursor, sql, {**constants, **params} if constants else params)
        return cursor

    def one(self, conn: Connection, **params: Any) -> Any:
        """The first row, or None."""
        return self.execute(conn, params).fetchone()

    def row(self, conn: Connection, **params: Any) -> Any:
        """The first row as a named tuple (columns read by name: ``row.available_nano``), or
        None. The tuple type is built once, from the cursor's column names."""
        cursor = self.execute(conn, params)
        raw = cursor.fetchone()
        if raw is None:
            return None
        if self._row_type is None:
            self._row_type = namedtuple("Row", [d[0] for d in cursor.description])  # type: ignore[misc]  # noqa: PYI024
        return self._row_type._make(raw)

    def rowcount(self, conn: Connection, **params: Any) -> int:
        return int(self.execute(conn, params).rowcount)


def upsert(table: sa.Table, keys: Sequence[str], add: Sequence[str],
           set_: Sequence[str] = ()) -> Prepared:
    """``INSERT … ON CONFLICT (keys) DO UPDATE``: columns in ``add`` are summed with the stored
    row, columns in ``set_`` replaced; every column is a bind parameter of its own name."""
    return Prepared(lambda dialect: upsert_statement(dialect, table, keys, add, set_))


def upsert_statement(dialect: str, table: sa.Table, keys: Sequence[str], add: Sequence[str],
                     set_: Sequence[str] = ()) -> Any:
    """The statement of :func:`upsert` in ``dialect`` (to build on: ``add_cte``)."""
    insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
    stmt = insert(table).values({c.name: sa.bindparam(c.name) for c in table.c})
    changes = {name: table.c[name] + stmt.excluded[name] for name in add}
    changes.update({name: stmt.excluded[name] for name in set_})
    return stmt.on_conflict_do_update(index_elements=list(keys), set_=changes)
