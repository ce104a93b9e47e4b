"""The marketplace listing: every item with its billing type, price and price per group."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Connection

from tollway.billing.views import iso
from tollway.pricing.display import price_fields, price_lines
from tollway.pricing.rating import resolve_ratio
from tollway.store.catalog import Item, current_items, group_ratios


def listing(conn: Connection, *, now_ms: int, item_id: str | None = None,
            display_groups: Iterable[str] = ()) -> dict[str, Any]:
    """Every item for sale (or the one ``item_id``). For each known group in
    ``display_groups``, items also carry ``group_display[group]``: that group's ratio and
    prices as people read them (the web marketplace shows them; the JSON API does not)."""
    ratios = group_ratios(conn)
    items = current_items(conn, now_ms=now_ms, item_id=item_id)
    data = [_item(item, ratios) for item in items]
    shown = [g for g in display_groups if g in ratios]
    for item, body in zip(items, data, strict=True):
        for group in shown:
            applied = resolve_ratio(group, ratios, item.version.group_ratios)
            body.setdefault("group_display", {})[group] = {
                "ratio": str(applied.value), "ratio_source": applied.source,
                "price_display": price_lines(item.version.price, applied.value)}
    return {"object": "list", "groups": {name: str(r) for name, r in sorted(ratios.items())},
            "data": data}


def _item(item: Item, ratios: dict[str, Any]) -> dict[str, Any]:
    version = item.version
    body: dict[str, Any] = {
        "id": item.id,
        "billing_type": item.billing_type,
        "provider": item.provider,
        "price": price_fields(version.price),
        "price_display": price_lines(version.price),
        "price_version": version.id,
        "effective_from": iso(version.effective_from_ms),
        "group_prices": {},
    }
    for group in sorted(ratios):
        applied = resolve_ratio(group, ratios, version.group_ratios)
        body["group_prices"][group] = {"ratio": str(applied.value), "ratio_source": applied.source,
                                       **price_fields(version.price, applied.value)}
    if item.billing_type == "token":
        body["max_output_tokens"] = item.spec.get("max_output_tokens")
    else:
        body["name"] = item.spec.get("name")
        body["method"] = item.spec.get("method")
        body["path"] = "/apis/v1" + str(item.spec.get("path"))
    return body
