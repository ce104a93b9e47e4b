"""What Tollway remembers of the Responses it relayed: each response id (and conversation id)
with the account that created it and the tokens of its context (the input + output it billed).

A request that continues one (``previous_response_id``, ``conversation``) sends the upstream
history Tollway never sees: its hold is sized with that history, and another account's id is
refused. Ordinary requests never touch this table.
"""

from __future__ import annotations

from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.prepared import Prepared, upsert
from tollway.store.tables import response_memory


class Remembered(NamedTuple):
    account_id: int
    context_tokens: int


_REMEMBER = upsert(response_memory, ("response_id",), (), ("context_tokens", "created_at_ms"))
_RECALL = Prepared(sa.select(response_memory.c.account_id, response_memory.c.context_tokens)
                   .where(response_memory.c.response_id == sa.bindparam("response_id")))


def remember(conn: Connection, ids: tuple[str, ...], *, account_id: int, context_tokens: int,
             at_ms: int) -> None:
    """Keep ``ids`` (a response's, and its conversation's) for ``account_id``; a
    conversation already known keeps its account and takes the newer context."""
    for response_id in ids:
        _REMEMBER.execute(conn, {"response_id": response_id, "account_id": account_id,
                                 "context_tokens": context_tokens, "created_at_ms": at_ms})


def forget_before(conn: Connection, *, before_ms: int) -> int:
    """Forget the ids remembered before ``before_ms`` (with the usage they belong to, by
    ``tollway usage prune``): a request continuing one then holds for its own input only."""
    return int(conn.execute(response_memory.delete().where(
        response_memory.c.created_at_ms < before_ms)).rowcount)


def recall(conn: Connection, response_id: str) -> Remembered | None:
    row = _RECALL.one(conn, response_id=response_id)
    return None if row is None else Remembered(int(row[0]), int(row[1]))
