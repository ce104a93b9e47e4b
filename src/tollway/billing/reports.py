"""What customers read: usage records with the explanation of their price, summaries and
monthly statements. Shared by the API, the CLI and exports, so all of them agree."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tollway.billing.csv_cells import row as csv_row
from tollway.billing.views import iso
from tollway.errors import InvalidRequest
from tollway.money import format_usd, nano_to_decimal
from tollway.pricing.rating import (
    AppliedRatio,
    CallPrice,
    CallUsage,
    Charge,
    TokenPrice,
    TokenUsage,
    rate_calls,
    rate_tokens,
)
from tollway.store.reports import Statement

REQUEST_TYPES = ("consume", "error")
#: Per-call records of this route count images (``n`` × the size's price), not calls.
IMAGES_ROUTE = "/v1/images/generations"
CSV_COLUMNS = ("created_at", "request_id", "type", "billing_type", "product", "key_id",
               "key_name", "group", "ratio", "ratio_source", "status", "stream",
               "input_tokens", "cached_input_tokens", "cache_write_tokens",
               "cache_write_1h_tokens", "output_tokens",
               "reasoning_tokens", "calls", "cost_usd", "credit_usd", "usage_source",
               "duration_ms", "note")


def _usd(nano: int | None) -> str | None:
    return None if nano is None else format_usd(int(nano))


def recharge(row: Any) -> Charge | None:
    """Rate a stored request record again from its own columns (the explanation's numbers)."""
    if row.type not in REQUEST_TYPES or row.ratio is None:
        return None
    ratio = AppliedRatio(Decimal(row.ratio), row.ratio_source)
    if row.billing_type == "per_call":
        # an image model's record keeps the unit price of the size it was billed at
        return rate_calls(CallUsage(int(row.calls)), CallPrice(nano_to_decimal(row.per_call_nano)),
                          ratio)
    write_1h = row.cache_write_1h_nano_per_1m  # NULL on records older than migration 0006
    tools = tool_calls(row)
    price = TokenPrice(nano_to_decimal(row.input_nano_per_1m),
                       nano_to_decimal(row.output_nano_per_1m),
                       nano_to_decimal(row.cache_read_nano_per_1m),
                       nano_to_decimal(row.cache_write_nano_per_1m),
                       None if write_1h is None else nano_to_decimal(write_1h),
                       tuple((tool, nano_to_decimal(t["nano_per_call"]))
                             for tool, t in tools.items() if t["nano_per_call"] is not None))
    usage = TokenUsage(int(row.input_tokens), int(row.output_tokens),
                       int(row.cached_input_tokens), int(row.cache_write_tokens),
                       int(row.cache_write_1h_tokens),
                       tuple((tool, int(t["calls"])) for tool, t in tools.items()))
    return rate_tokens(usage, price, ratio)


def tool_calls(row: Any) -> dict[str, Any]:
    """The record's server-side tool calls: {tool: {calls, nano_per_call}} (NULL before
    migration 0014, and on records without any)."""
    raw = getattr(row, "tool_calls", None)
    return dict(json.loads(raw)) if raw else {}


def _plain(value: Decimal) -> str:
    """A decimal as people write it: no exponent, no trailing zeros."""
    return format(value.normalize(), "f")


def pricing(row: Any) -> dict[str, Any] | None:
    """How the record's cost was reached, with every number, so it can be checked by hand."""
    charge = recharge(row)
    if charge is None:
        return None
    ratio = _plain(charge.ratio.value)
    body: dict[str, Any] = {
        "billing_type": row.billing_type, "price_version": row.price_version_id,
        "ratio": ratio, "ratio_source": charge.ratio.source,
        "components": [{"name": c.name, "quantity": c.quantity,
                        "unit_price_usd": _plain(c.unit_price_usd),
                        "amount_usd": _plain(c.amount_usd)} for c in charge.components],
        "exact_usd": _plain(charge.exact_usd),
        "rounded_usd": format_usd(charge.cost_nano_usd),
    }
    if row.billing_type == "per_call":
        (c,) = charge.components
        unit = "image" if row.route == IMAGES_ROUTE else "call"
        body["unit"] = f"per {unit}"
        body["formula"] = (f"{c.quantity} {unit} × {_plain(c.unit_price_usd)} × {ratio} = "
                           f"{_plain(charge.exact_usd)} → {format_usd(charge.cost_nano_usd)} USD")
    else:
        parts = {c.name: c for c in charge.components}
        body["unit"] = "per 1M tokens"
        tokens = (
            f"(({row.input_tokens} − {row.cached_input_tokens} − {row.cache_write_tokens} − "
            f"{row.cache_write_1h_tokens}) × "
            f"{_plain(parts['input'].unit_price_usd)} + {row.cached_input_tokens} × "
            f"{_plain(parts['cache_read'].unit_price_usd)} + {row.cache_write_tokens} × "
            f"{_plain(parts['cache_write'].unit_price_usd)} + {row.cache_write_1h_tokens} × "
            f"{_plain(parts['cache_write_1h'].unit_price_usd)} + {row.output_tokens} × "
            f"{_plain(parts['output'].unit_price_usd)}) / 1000000")
        tools = [c for c in charge.components if c.name.startswith("tool:")]
        if tools:  # server-side tool fees, per call, added before the ratio
            tokens = "(" + tokens + "".join(
                f" + {c.quantity} × {_plain(c.unit_price_usd)} [{c.name[5:]}]"
                for c in tools) + ")"
        body["formula"] = (f"{tokens} × {ratio} = {_plain(charge.exact_usd)} → "
                           f"{format_usd(charge.cost_nano_usd)} USD")
    if row.type == "error":
        body["charged"] = False
        body["why_not_charged"] = row.note or "the request failed"
    else:
        body["charged"] = True
    return body


def record_view(row: Any, *, explain: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row.id, "request_id": row.request_id, "created_at": iso(row.created_at_ms),
        "type": row.type, "account_id": row.account_id, "key_id": row.key_id,
        "key_name": row.key_name, "group": row.group_name, "ratio": row.ratio,
        "ratio_source": row.ratio_source, "billing_type": row.billing_type,
        "product": row.product, "route": row.route, "status": row.status,
        "stream": bool(row.stream), "duration_ms": row.duration_ms, "ttft_ms": row.ttft_ms,
        "input_tokens": row.input_tokens, "cached_input_tokens": row.cached_input_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        "cache_write_1h_tokens": row.cache_write_1h_tokens, "output_tokens": row.output_tokens,
        "reasoning_tokens": row.reasoning_tokens, "calls": row.calls,
        "tool_calls": {tool: {"calls": t["calls"], "price_per_call_usd": _usd(
            t["nano_per_call"])} for tool, t in tool_calls(row).items()},
        "unit_prices_usd": {
            "input_per_1m": _usd(row.input_nano_per_1m),
            "output_per_1m": _usd(row.output_nano_per_1m),
            "cache_read_per_1m": _usd(row.cache_read_nano_per_1m),
            "cache_write_per_1m": _usd(row.cache_write_nano_per_1m),
            "cache_write_1h_per_1m": _usd(row.cache_write_1h_nano_per_1m),
            "per_call": _usd(row.per_call_nano)},
        "price_version": row.price_version_id, "cost_usd": format_usd(row.cost_nano),
        "credit_usd": format_usd(row.credit_nano), "usage_source": row.usage_source,
        "error_code": row.error_code, "note": row.note,
    }
    if explain:
        view["pricing"] = pricing(row)
    return view


def operator_view(row: Any) -> dict[str, Any]:
    """A record as the operator reads it: the customer's view plus the channel that answered,
    every attempt, and the upstream cost (computed, reported, flagged)."""
    view = record_view(row)
    view.update({
        "channel": row.channel,
        "attempts": json.loads(row.attempts) if row.attempts else [],
        "upstream_cost_usd": _usd(row.upstream_cost_nano),
        "upstream_reported_cost_usd": _usd(row.upstream_reported_cost_nano),
        "upstream_cost_mismatch": row.upstream_cost_mismatch})
    return view


def export_csv(rows: Iterable[Any]) -> Iterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for count, row in enumerate(rows, 1):
        view = record_view(row, explain=False)
        writer.writerow(csv_row("" if view.get(c) is None else view[c] for c in CSV_COLUMNS))
        if count % 500 == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


def export_jsonl(rows: Iterable[Any]) -> Iterator[bytes]:
    chunk: list[bytes] = []
    for row in rows:
        chunk.append(json.dumps(record_view(row)).encode() + b"\n")
        if len(chunk) >= 500:
            yield b"".join(chunk)
            chunk = []
    yield b"".join(chunk)


def summary_view(rows: list[dict[str, Any]], totals: dict[str, int], *, start_ms: int,
                 end_ms: int) -> dict[str, Any]:
    minutes = Decimal(max(end_ms - start_ms, 60_000)) / 60_000

    def counters(data: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {k: int(v) for k, v in data.items()
                               if k != "cost_nano" and k in totals}
        out["cost_usd"] = format_usd(int(data["cost_nano"]))
        return out

    def labels(row: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if k not in totals}
        for key in ("day_ms", "hour_ms"):
            if key in out:
                out[key.removesuffix("_ms")] = iso(int(out.pop(key)))
        return out

    tokens = totals["input_tokens"] + totals["output_tokens"]
    return {
        "start": iso(start_ms), "end": iso(end_ms),
        "totals": {**counters(totals),
                   "average_rpm": str((totals["requests"] / minutes).quantize(Decimal("0.001"))),
                   "average_tpm": str((tokens / minutes).quantize(Decimal("0.001")))},
        "data": [{**labels(row), **counters(row)} for row in rows],
    }


def month_bounds(month: str) -> tuple[int, int]:
    try:
        if not re.fullmatch(r"\d{4}-\d{2}", month):
            raise ValueError
        start = datetime.strptime(month, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        raise InvalidRequest(f"month must be YYYY-MM, got {month!r}") from None
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
        month=start.month + 1)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def statement_view(account: Any, month: str, st: Statement) -> dict[str, Any]:
    credits = st.topups_nano + max(st.adjustments_nano, 0) + st.grants_nano
    debits = st.charges_nano + max(-st.adjustments_nano, 0) + st.grants_expired_nano
    return {
        "account": {"id": account.id, "name": account.name, "group": account.group},
        "month": month,
        "opening_balance_usd": format_usd(st.opening_nano),
        "opening_paid_usd": format_usd(st.opening_paid_nano),
        "opening_promotional_usd": format_usd(st.opening_promo_nano),
        "topups_usd": format_usd(st.topups_nano),
        "adjustments_usd": format_usd(st.adjustments_nano),
        "grants_added_usd": format_usd(st.grants_nano),
        "grants_spent_usd": format_usd(st.grants_spent_nano),
        "grants_expired_usd": format_usd(st.grants_expired_nano),
        "charges_usd": format_usd(st.charges_nano),
        "written_off_usd": format_usd(st.written_off_nano),
        "closing_balance_usd": format_usd(st.closing_nano),
        "closing_paid_usd": format_usd(st.closing_paid_nano),
        "closing_promotional_usd": format_usd(st.closing_promo_nano),
        "reconciliation": (f"{format_usd(st.opening_nano)} + {format_usd(credits)} − "
                           f"{format_usd(debits)} = {format_usd(st.closing_nano)}"),
        "promotional_reconciliation": (
            f"{format_usd(st.opening_promo_nano)} + {format_usd(st.grants_nano)} − "
            f"{format_usd(st.grants_spent_nano)} − {format_usd(st.grants_expired_nano)} = "
            f"{format_usd(st.closing_promo_nano)}"),
        "charges_by_product": [
            {"product": p["product"], "billing_type": p["billing_type"],
             "requests": int(p["requests"]), "calls": int(p["calls"]),
             "input_tokens": int(p["input_tokens"]), "output_tokens": int(p["output_tokens"]),
             "cost_usd": format_usd(int(p["cost_nano"]))} for p in st.by_product],
    }


#: A statement's balance lines, in the order every rendering shows them: (label, key).
#: Grants are promotional credit (spent before paid money); "grants spent" is the part of
#: "charges paid" that came out of them.
STATEMENT_LINES = (
    ("opening balance", "opening_balance_usd"), ("opening paid", "opening_paid_usd"),
    ("opening promotional", "opening_promotional_usd"), ("top-ups", "topups_usd"),
    ("adjustments", "adjustments_usd"), ("grants added", "grants_added_usd"),
    ("charges paid", "charges_usd"), ("grants spent", "grants_spent_usd"),
    ("grants expired", "grants_expired_usd"), ("written off", "written_off_usd"),
    ("closing balance", "closing_balance_usd"), ("closing paid", "closing_paid_usd"),
    ("closing promotional", "closing_promotional_usd"))


def statement_csv(view: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = _SafeWriter(csv.writer(buffer))
    writer.writerow(["line", "product", "requests", "amount_usd"])
    for line, key in STATEMENT_LINES:
        writer.writerow([line, "", "", view[key]])
    for item in view["charges_by_product"]:
        writer.writerow(["charge", item["product"], item["requests"], item["cost_usd"]])
    return buffer.getvalue()


class _SafeWriter:
    """A ``csv.writer`` whose cells are neutralised (``billing.csv_cells``)."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def writerow(self, values: Iterable[Any]) -> None:
        self.writer.writerow(csv_row(values))
