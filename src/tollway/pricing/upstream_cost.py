"""What the operator pays upstream for a request: the channel's ``cost`` (same fields as a
price) applied to the usage billed to the customer, with the same exact arithmetic and one
rounding (no group ratio: the operator's cost does not depend on who called)."""

from __future__ import annotations

import json
from decimal import Decimal

from tollway.pricing.rating import (
    AppliedRatio,
    CallPrice,
    CallUsage,
    Price,
    TokenPrice,
    TokenUsage,
    rate_calls,
    rate_tokens,
)

_AT_COST = AppliedRatio(Decimal(1), "group")


def upstream_cost_nano(cost: Price, usage: TokenUsage, calls: int,
                       size: str | None = None) -> int | None:
    """``cost`` × the billed usage in nano-USD; None when the cost does not price it (a
    size the cost does not list)."""
    if isinstance(cost, TokenPrice):
        return rate_tokens(usage, cost, _AT_COST).cost_nano_usd
    assert isinstance(cost, CallPrice)
    unit = cost.for_size(size)
    if unit is None:
        return None
    return rate_calls(CallUsage(calls), cost, _AT_COST, unit_price=unit).cost_nano_usd


def reported_cost(raw: bytes) -> Decimal | None:
    """The cost an upstream reports with its usage (OpenRouter: ``usage.cost``, USD), read
    from the JSON text exactly, as a Decimal of its digits; None when absent or invalid."""
    if b'"cost"' not in raw:
        return None
    try:
        obj = json.loads(raw, parse_float=Decimal, parse_int=Decimal)
    except ValueError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    value = usage.get("cost") if isinstance(usage, dict) else None
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        return None
    return value
