"""Revenue against upstream cost over the usage log (the operator's margin report)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import usage_records

DAY_MS = 86_400_000
GROUPS = ("model", "channel", "day")


def margin_rows(conn: Connection, *, start_ms: int, end_ms: int,
                group_by: str) -> list[dict[str, Any]]:
    """Per group: requests, revenue (cost_nano), upstream cost where known, the requests
    without a known upstream cost, the upstream's reported cost and the flagged records."""
    u = usage_records.c
    key: Any = {"model": u.product, "channel": u.channel,
                "day": u.created_at_ms - u.created_at_ms % DAY_MS}[group_by]
    query = (sa.select(
        key.label("key"), sa.func.count().label("requests"),
        sa.func.coalesce(sa.func.sum(u.cost_nano), 0).label("revenue"),
        sa.func.coalesce(sa.func.sum(u.upstream_cost_nano), 0).label("upstream_cost"),
        sa.func.count(u.upstream_cost_nano).label("costed"),
        sa.func.coalesce(sa.func.sum(u.cost_nano).filter(u.upstream_cost_nano.isnot(None)),
                         0).label("costed_revenue"),
        sa.func.coalesce(sa.func.sum(u.upstream_reported_cost_nano), 0).label("reported"),
        sa.func.count(u.upstream_reported_cost_nano).label("reported_count"),
        sa.func.count().filter(u.upstream_cost_mismatch.is_(True)).label("mismatched"))
        .where(u.type == "consume", u.created_at_ms >= start_ms, u.created_at_ms < end_ms)
        .group_by(key).order_by(key))
    return [dict(r._mapping) for r in conn.execute(query)]


def mismatched(conn: Connection, *, start_ms: int, end_ms: int, limit: int = 100) -> list[Any]:
    """Records whose upstream-reported cost differs from the computed one (newest first)."""
    u = usage_records.c
    return list(conn.execute(
        sa.select(u.request_id, u.created_at_ms, u.product, u.channel, u.upstream_cost_nano,
                  u.upstream_reported_cost_nano)
        .where(u.upstream_cost_mismatch.is_(True), u.created_at_ms >= start_ms,
               u.created_at_ms < end_ms)
        .order_by(u.created_at_ms.desc(), u.id.desc()).limit(limit)))
