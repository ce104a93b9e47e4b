"""Usage records and request idempotency keys (hot path: prepared statements)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ClauseElement

from tollway.store.prepared import Prepared, upsert, upsert_statement
from tollway.store.tables import request_keys, usage_records, usage_rollups

_b = sa.bindparam
_INSERT_USAGE = Prepared(usage_records.insert().values(
    {c.name: _b(c.name) for c in usage_records.c if c.name != "id"}))
#: What a gateway request's record must give (a non-request event gives fewer).
USAGE_COLUMNS = frozenset(c.name for c in usage_records.c if c.name != "id") - {"credit_nano"}
HOUR_MS = 3_600_000
_COUNTERS = ("requests", "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
             "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "calls", "cost_nano")
_ROLLUP_KEYS = ("account_id", "hour_ms", "key_id", "product")
_ROLLUP = upsert(usage_rollups, _ROLLUP_KEYS, _COUNTERS)


def _record_and_rollup(dialect: str) -> ClauseElement:
    """PostgreSQL: the record (a data-modifying CTE) and its rollup upsert in one statement,
    one round trip's work less for the server and the writer. The rollup's bind parameters
    that share a record column's name (tokens, calls, cost) carry the same value."""
    record = usage_records.insert().values(
        {c.name: _b(c.name) for c in usage_records.c if c.name != "id"}).cte("record")
    rollup = upsert_statement(dialect, usage_rollups, _ROLLUP_KEYS, _COUNTERS)
    return rollup.add_cte(record)  # type: ignore[no-any-return]


_RECORD_AND_ROLLUP = Prepared(_record_and_rollup)
_EVENT_EXISTS = Prepared(sa.select(usage_records.c.id)
                         .where(usage_records.c.request_id == _b("request_id")))

_FIND_REQUEST_KEY = Prepared(
    sa.select(request_keys.c.request_id, request_keys.c.fingerprint, request_keys.c.state,
              request_keys.c.status, request_keys.c.content_type, request_keys.c.body,
              request_keys.c.cost_nano, request_keys.c.created_at_ms)
    .where(request_keys.c.key_id == _b("key_id"),
           request_keys.c.idempotency_key == _b("idempotency_key")))
_INSERT_REQUEST_KEY = Prepared(request_keys.insert().values(
    key_id=_b("key_id"), idempotency_key=_b("idempotency_key"), request_id=_b("request_id"),
    fingerprint=_b("fingerprint"), state="pending", created_at_ms=_b("at")))
_DELETE_REQUEST_KEY = Prepared(request_keys.delete().where(
    request_keys.c.key_id == _b("key_id"),
    request_keys.c.idempotency_key == _b("idempotency_key")))
_COMPLETE_REQUEST_KEY = Prepared(
    request_keys.update().where(request_keys.c.key_id == _b("key_id"),
                                request_keys.c.idempotency_key == _b("idempotency_key"))
    .values(state="done", status=_b("status"), content_type=_b("content_type"),
            body=_b("body"), cost_nano=_b("cost_nano")))


def insert_usage(conn: Connection, fields: dict[str, Any]) -> None:
    """A gateway request's record, and its share of the hourly rollup, in one transaction.
    Every column must be given (a missing one is a bug, not a NULL)."""
    missing = USAGE_COLUMNS - fields.keys()
    assert not missing, f"usage record lacks {sorted(missing)}"
    error = fields["type"] == "error"
    rollup = {"hour_ms": fields["created_at_ms"] - fields["created_at_ms"] % HOUR_MS,
              "requests": 0 if error else 1, "errors": 1 if error else 0}
    if conn.dialect.name == "postgresql":  # one statement: see _record_and_rollup
        _RECORD_AND_ROLLUP.execute(conn, {**fields, "credit_nano": 0, **rollup})
        return
    _INSERT_USAGE.execute(conn, {**fields, "credit_nano": 0})
    _ROLLUP.execute(conn, {
        **{name: fields[name] for name in _COUNTERS[2:]},
        "account_id": fields["account_id"], "key_id": fields["key_id"],
        "product": fields["product"], "billing_type": fields["billing_type"], **rollup})


def insert_event(conn: Connection, *, event_id: str, account_id: int, type_: str, at_ms: int,
                 credit_nano: int = 0, key_id: int | None = None, key_name: str | None = None,
                 note: str | None = None) -> None:
    """Activity that is not a request (top-up, adjustment, key created or revoked), so the log
    is the account's whole history. ``event_id`` makes a repeat write nothing."""
    if _EVENT_EXISTS.one(conn, request_id=event_id) is not None:
        return
    blank: dict[str, Any] = {c: None for c in USAGE_COLUMNS}
    blank.update({c: 0 for c in _COUNTERS if c in blank} | {"stream": False})
    _INSERT_USAGE.execute(conn, {**blank, "request_id": event_id, "created_at_ms": at_ms,
                                 "account_id": account_id, "type": type_,
                                 "credit_nano": credit_nano, "key_id": key_id,
                                 "key_name": key_name, "note": note})


def find_request_key(conn: Connection, key_id: int, idempotency_key: str) -> Any:
    """The key's row, read by name (request_id, fingerprint, state, status, content_type,
    body, cost_nano, created_at_ms), or None."""
    return _FIND_REQUEST_KEY.row(conn, key_id=key_id, idempotency_key=idempotency_key)


def claim_request_key(conn: Connection, *, key_id: int, idempotency_key: str, request_id: str,
                      fingerprint: str, at_ms: int) -> None:
    _DELETE_REQUEST_KEY.execute(conn, {"key_id": key_id, "idempotency_key": idempotency_key})
    _INSERT_REQUEST_KEY.execute(conn, {"key_id": key_id, "idempotency_key": idempotency_key,
                                       "request_id": request_id, "fingerprint": fingerprint,
                                       "at": at_ms})


def release_request_key(conn: Connection, *, key_id: int, idempotency_key: str) -> None:
    _DELETE_REQUEST_KEY.execute(conn, {"key_id": key_id, "idempotency_key": idempotency_key})


def complete_request_key(conn: Connection, *, key_id: int, idempotency_key: str, status: int,
                         content_type: str, body: bytes | None, cost_nano: int) -> None:
    _COMPLETE_REQUEST_KEY.execute(conn, {"key_id": key_id, "idempotency_key": idempotency_key,
                                         "status": status, "content_type": content_type,
                                         "body": body, "cost_nano": cost_nano})


def get_usage(conn: Connection, request_id: str) -> Any:
    return conn.execute(sa.select(usage_records)
                        .where(usage_records.c.request_id == request_id)).first()
