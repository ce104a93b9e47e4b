"""Reads for the usage log, summaries and statements. Indexed reads only: keyset pages over
(created_at, id), summaries from the hourly rollups, statements from the daily wallet rows.
No ``COUNT(*)`` per page, no scan of the raw log for a report."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.errors import InvalidRequest
from tollway.store.catalog import endpoint_ids
from tollway.store.tables import api_keys, usage_records, usage_rollups, wallet_days

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
LOG_TYPES = ("consume", "error", "topup", "adjustment", "refund", "system")
GROUP_BY = ("model", "endpoint", "product", "key", "day", "hour", "billing_type", "account")
COUNTERS = ("requests", "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
            "cache_write_1h_tokens", "output_tokens", "reasoning_tokens", "calls", "cost_nano")
#: Records an operator should look at: billed from a local count (the upstream sent no usable
#: usage) or from usage capped at the request's bounds (the upstream reported more than the
#: request could have used). The note on each says why.
REVIEW_SOURCES = ("capped", "estimated")


@dataclass(frozen=True, slots=True)
class LogFilter:
    account_id: int | None = None  # None: every account (operators only)
    start_ms: int | None = None  # inclusive
    end_ms: int | None = None  # exclusive
    product: str | None = None  # a model or endpoint id
    key_id: int | None = None
    group: str | None = None
    type: str | None = None
    billing_type: str | None = None
    review: bool = False  # only records whose usage_source is in REVIEW_SOURCES

    def __post_init__(self) -> None:
        for name in ("product", "group", "type", "billing_type"):
            value = getattr(self, name)
            if value is not None and "\x00" in value:  # PostgreSQL refuses NUL in text
                raise InvalidRequest(f"{name} must not contain NUL characters")

    def clauses(self) -> list[sa.ColumnElement[bool]]:
        u = usage_records.c
        found: list[sa.ColumnElement[bool]] = []
        for column, value in ((u.account_id, self.account_id), (u.product, self.product),
                              (u.key_id, self.key_id), (u.group_name, self.group),
                              (u.type, self.type), (u.billing_type, self.billing_type)):
            if value is not None:
                found.append(column == value)
        if self.review:
            found.append(u.usage_source.in_(REVIEW_SOURCES))
        if self.start_ms is not None:
            found.append(u.created_at_ms >= self.start_ms)
        if self.end_ms is not None:
            found.append(u.created_at_ms < self.end_ms)
        return found


def encode_cursor(created_at_ms: int, record_id: int) -> str:
    return base64.urlsafe_b64encode(f"{created_at_ms}.{record_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, record_id = (int(part) for part in raw.split("."))
        if not (0 <= at < 2**63 and 0 < record_id < 2**63):  # no column holds more
            raise ValueError(raw)
        return at, record_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("cursor is not one this API returned") from None


def usage_page(conn: Connection, where: LogFilter, *, limit: int,
               cursor: str | None = None) -> tuple[list[Any], str | None]:
    """Newest first; ``next_cursor`` is None on the last page. Records that arrive while a
    client pages are newer than its cursor, so they never shift or repeat a later page."""
    u = usage_records.c
    query = sa.select(usage_records).where(*where.clauses())
    if cursor is not None:
        at, record_id = decode_cursor(cursor)
        # a row-value comparison: one index range on both SQLite and PostgreSQL
        query = query.where(sa.tuple_(u.created_at_ms, u.id) < sa.tuple_(
            sa.literal(at, sa.BigInteger), sa.literal(record_id, sa.BigInteger)))
    rows = list(conn.execute(query.order_by(u.created_at_ms.desc(), u.id.desc())
                             .limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at_ms, last.id)


def iter_usage(conn: Connection, where: LogFilter, *, chunk: int = 2000) -> Iterator[Any]:
    """Every matching record, newest first, in keyset chunks (constant memory)."""
    cursor = None
    while True:
        rows, cursor = usage_page(conn, where, limit=chunk, cursor=cursor)
        yield from rows
        if cursor is None:
            return


def get_record(conn: Connection, request_id: str, *, account_id: int | None) -> Any:
    if "\x00" in request_id:  # no request id has one (and PostgreSQL refuses it)
        return None
    query = sa.select(usage_records).where(usage_records.c.request_id == request_id)
    if account_id is not None:
        query = query.where(usage_records.c.account_id == account_id)
    return conn.execute(query).first()


def summary(conn: Connection, *, account_id: int | None, start_ms: int, end_ms: int,
            group_by: Sequence[str]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows per group and the period's totals, from the hourly rollups (hours starting in
    [start_ms, end_ms)). Grouping by model keeps models only (token-priced ones and image
    models, which are billed per image), by endpoint data-API endpoints only, by both (or by
    product) everything; the totals always cover everything."""
    r = usage_rollups.c
    keys: list[sa.ColumnElement[Any]] = []
    for name in group_by:
        if name in ("model", "endpoint", "product"):
            keys.append(r.product.label("product"))
        elif name == "key":
            keys.append(r.key_id.label("key_id"))
        elif name == "day":
            # whole days: "/" is true division in SQLAlchemy 2 (CAST AS NUMERIC / REAL)
            keys.append((r.hour_ms - r.hour_ms % DAY_MS).label("day_ms"))
        elif name == "hour":
            keys.append(r.hour_ms.label("hour_ms"))
        elif name == "billing_type":
            keys.append(r.billing_type.label("billing_type"))
        elif name == "account":  # operators: revenue by account
            keys.append(r.account_id.label("account_id"))
        else:
            raise InvalidRequest(f"group_by must be among {', '.join(GROUP_BY)}, got {name!r}")
    unique = list({str(k.name): k for k in keys}.values())
    where = [r.hour_ms >= start_ms, r.hour_ms < end_ms]
    if account_id is not None:
        where.append(r.account_id == account_id)
    sums = [sa.func.coalesce(sa.func.sum(r[c]), 0).label(c) for c in COUNTERS]
    totals_row = conn.execute(sa.select(*sums).where(*where)).one()  # the whole period
    totals = {c: int(totals_row._mapping[c]) for c in COUNTERS}
    if ("model" in group_by) != ("endpoint" in group_by):
        # the rollups know a product's billing type, not its kind: per call is an endpoint's
        # and an image model's, so the catalog says which products are endpoints
        endpoints = r.product.in_(endpoint_ids(conn))
        where.append(endpoints if "endpoint" in group_by else sa.not_(endpoints))
    query = sa.select(*unique, *sums).where(*where)
    if unique:
        query = query.group_by(*unique).order_by(*unique)
    rows = [dict(row._mapping) for row in conn.execute(query)]
    if "key_id" in {str(k.name) for k in unique}:
        names = dict(conn.execute(sa.select(api_keys.c.id, api_keys.c.name).where(
            api_keys.c.id.in_({row["key_id"] for row in rows}))).all())
        for row in rows:
            row["key_name"] = names.get(row["key_id"])
    return rows, totals


@dataclass(frozen=True, slots=True)
class Statement:
    opening_nano: int
    topups_nano: int
    adjustments_nano: int  # signed, promotional grants and their expiry excluded
    charges_nano: int  # paid from the wallet
    written_off_nano: int
    closing_nano: int
    by_product: list[dict[str, Any]]
    opening_promo_nano: int = 0  # the promotional part of the opening balance
    grants_nano: int = 0  # promotional credit granted in the period
    grants_spent_nano: int = 0  # ... spent (charges paid from it)
    grants_expired_nano: int = 0  # ... expired and taken back
    closing_promo_nano: int = 0

    @property
    def opening_paid_nano(self) -> int:
        return self.opening_nano - self.opening_promo_nano

    @property
    def closing_paid_nano(self) -> int:
        return self.closing_nano - self.closing_promo_nano


def _promo_before(conn: Connection, account_id: int, before_ms: int) -> int:
    """The wallet's promotional part at ``before_ms`` (a day boundary): the snapshot of the
    last day with a movement before it."""
    w = wallet_days.c
    found = conn.execute(sa.select(w.promo_end_nano).where(
        w.account_id == account_id, w.day_ms < before_ms).order_by(w.day_ms.desc())
        .limit(1)).scalar()
    return 0 if found is None else int(found)


def statement(conn: Connection, account_id: int, *, start_ms: int, end_ms: int) -> Statement:
    """A month from the wallet's daily movements: the opening balance is every movement
    before it, so opening + movements = closing by construction (and ``ledger verify`` checks
    that all movements add up to the balance). The promotional part opens and closes at the
    day snapshots around the month; what grants, expiries and those snapshots leave is what
    spending took from it."""
    w = wallet_days.c
    net = (w.topups_nano + w.adjustments_nano + w.grants_nano - w.grants_expired_nano
           - w.charges_nano)
    opening = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(net), 0))
                               .where(w.account_id == account_id, w.day_ms < start_ms))
                  .scalar_one())
    month = conn.execute(sa.select(
        *[sa.func.coalesce(sa.func.sum(c), 0).label(c.name) for c in (
            w.topups_nano, w.adjustments_nano, w.charges_nano, w.written_off_nano,
            w.grants_nano, w.grants_expired_nano)])
        .where(w.account_id == account_id, w.day_ms >= start_ms, w.day_ms < end_ms)).one()
    topups, adjustments, charges, written_off, granted, expired = (int(v) for v in month)
    opening_promo = _promo_before(conn, account_id, start_ms)
    closing_promo = _promo_before(conn, account_id, end_ms)
    r = usage_rollups.c
    by_product = [dict(row._mapping) for row in conn.execute(
        sa.select(r.product, r.billing_type,
                  sa.func.sum(r.requests).label("requests"),
                  sa.func.sum(r.calls).label("calls"),
                  sa.func.sum(r.input_tokens).label("input_tokens"),
                  sa.func.sum(r.output_tokens).label("output_tokens"),
                  sa.func.sum(r.cost_nano).label("cost_nano"))
        .where(r.account_id == account_id, r.hour_ms >= start_ms, r.hour_ms < end_ms)
        .group_by(r.product, r.billing_type).order_by(r.product))]
    return Statement(opening, topups, adjustments, charges, written_off,
                     opening + topups + adjustments + granted - expired - charges, by_product,
                     opening_promo, granted, opening_promo + granted - expired - closing_promo,
                     expired, closing_promo)


def prune_usage(conn: Connection, *, before_ms: int, limit: int) -> int:
    """Delete up to ``limit`` raw usage records older than ``before_ms``. Postings, rollups and
    wallet days are never touched, so summaries and statements stay whole."""
    ids = sa.select(usage_records.c.id).where(usage_records.c.created_at_ms < before_ms) \
        .order_by(usage_records.c.created_at_ms).limit(limit).scalar_subquery()
    return int(conn.execute(usage_records.delete().where(usage_records.c.id.in_(ids))).rowcount)
