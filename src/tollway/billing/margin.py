"""The operator's margin: revenue, upstream cost and margin per model, channel or day, and
the records where an upstream's own reported cost disagrees with the computed one. Shared by
the admin API and the CLI."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Connection

from tollway.billing.views import iso
from tollway.errors import InvalidRequest
from tollway.money import format_usd
from tollway.store import margin as store


def margin_report(conn: Connection, *, start_ms: int, end_ms: int,
                  group_by: str = "model") -> dict[str, Any]:
    if group_by not in store.GROUPS:
        raise InvalidRequest(f"group_by must be one of {', '.join(store.GROUPS)}")
    if start_ms >= end_ms:
        raise InvalidRequest("from must be before to")
    rows = store.margin_rows(conn, start_ms=start_ms, end_ms=end_ms, group_by=group_by)
    totals = {k: sum(int(r[k]) for r in rows) for k in
              ("requests", "revenue", "upstream_cost", "costed", "costed_revenue", "reported",
               "reported_count", "mismatched")}
    flagged = store.mismatched(conn, start_ms=start_ms, end_ms=end_ms)
    return {
        "object": "margin", "from": iso(start_ms), "to": iso(end_ms), "group_by": group_by,
        "data": [_line(r, group_by) for r in rows], "total": _line(totals, None),
        "mismatched_records": [
            {"request_id": f.request_id, "created_at": iso(f.created_at_ms),
             "model": f.product, "channel": f.channel,
             "upstream_cost_usd": format_usd(f.upstream_cost_nano),
             "upstream_reported_cost_usd": format_usd(f.upstream_reported_cost_nano)}
            for f in flagged]}


def _line(row: dict[str, Any], group_by: str | None) -> dict[str, Any]:
    line: dict[str, Any] = {}
    if group_by is not None:
        key = row["key"]
        line[group_by] = str(iso(int(key)))[:10] if group_by == "day" else key
    costed_revenue, cost = int(row["costed_revenue"]), int(row["upstream_cost"])
    line.update({
        "requests": int(row["requests"]),
        "revenue_usd": format_usd(int(row["revenue"])),
        "upstream_cost_usd": format_usd(cost),
        # over the requests whose upstream cost is known (a channel with a ``cost``)
        "margin_usd": format_usd(costed_revenue - cost),
        "requests_without_cost": int(row["requests"]) - int(row["costed"]),
        "upstream_reported_cost_usd": (format_usd(int(row["reported"]))
                                       if int(row["reported_count"]) else None),
        "mismatched_records": int(row["mismatched"]),
    })
    return line
