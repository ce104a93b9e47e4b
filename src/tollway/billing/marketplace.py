"""The marketplace listing: every item with its billing type, price and price per group, and,
for models, the gateway routes it can be called through."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Connection

from tollway.billing.views import iso
from tollway.pricing.display import price_fields, price_lines
from tollway.pricing.rating import resolve_ratio
from tollway.store.catalog import (
    Item,
    current_items,
    group_ratios,
    item_protocols,
    item_routes,
    list_providers,
)


def item_unit(item: Item) -> str:
    """What a per-call price buys: an image (image models) or a call (data APIs)."""
    return "call" if item.spec.is_endpoint else "image"


def listing(conn: Connection, *, now_ms: int, item_id: str | None = None,
            display_groups: Iterable[str] = ()) -> dict[str, Any]:
    """Every item for sale (or the one ``item_id``). For each known group in
    ``display_groups``, items also carry ``group_display[group]``: that group's ratio and
    prices as people read them (the web marketplace shows them; the JSON API does not)."""
    ratios = group_ratios(conn)
    items = current_items(conn, now_ms=now_ms, item_id=item_id)
    kinds = {pid: kind for pid, (kind, _) in list_providers(conn).items()}
    data = [_item(item, ratios, kinds) for item in items]
    shown = [g for g in display_groups if g in ratios]
    for item, body in zip(items, data, strict=True):
        for group in shown:
            applied = resolve_ratio(group, ratios, item.version.group_ratios)
            body.setdefault("group_display", {})[group] = {
                "ratio": str(applied.value), "ratio_source": applied.source,
                "price_display": price_lines(item.version.price, applied.value,
                                             per=item_unit(item))}
    return {"object": "list", "groups": {name: str(r) for name, r in sorted(ratios.items())},
            "data": data}


def _item(item: Item, ratios: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    version = item.version
    body: dict[str, Any] = {
        "id": item.id,
        "billing_type": item.billing_type,
        "provider": item.provider,
        "price": price_fields(version.price),
        "price_display": price_lines(version.price, per=item_unit(item)),
        "price_version": version.id,
        "effective_from": iso(version.effective_from_ms),
        "group_prices": {},
    }
    for group in sorted(ratios):
        applied = resolve_ratio(group, ratios, version.group_ratios)
        body["group_prices"][group] = {"ratio": str(applied.value), "ratio_source": applied.source,
                                       **price_fields(version.price, applied.value)}
    if not item.spec.is_endpoint:  # a model: token-priced, or an image model per image
        if item.billing_type == "token":
            body["max_output_tokens"] = item.spec.max_output_tokens
            body["context_window"] = item.spec.input_bound
        protocols = item_protocols(item, kinds)
        body["routes"] = item_routes(item, protocols)
        body["providers"] = protocols
    else:
        body["name"] = item.spec.name
        body["method"] = item.spec.method
        body["path"] = "/apis/v1" + str(item.spec.path)
    return body
