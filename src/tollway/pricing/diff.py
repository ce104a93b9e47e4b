"""What applying a catalog file would change, in words an operator checks before confirming.

Pure: it compares what is for sale now (each item's price in effect, its group-ratio
overrides and its attributes, plus the group ratios) with a parsed :class:`Catalog`. The
store decides what actually gets written (``apply_catalog``); this only explains it, so the
preview page can list every change with its old and new value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from tollway.pricing.catalog import Catalog, ItemSpec, Listing
from tollway.pricing.display import price_lines
from tollway.pricing.rating import Price


@dataclass(frozen=True, slots=True)
class ItemState:
    """An item as it is for sale now: what a new catalog file is compared with."""

    id: str
    billing_type: str
    provider: str
    price: Price
    group_ratios: Mapping[str, Decimal]
    spec: ItemSpec


@dataclass(frozen=True, slots=True)
class Change:
    """One changed value of one item: ``what`` (e.g. ``price``), before and after."""

    item: str
    what: str
    old: str
    new: str


@dataclass
class CatalogDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # deactivated by the apply
    changes: list[Change] = field(default_factory=list)
    groups_added: dict[str, str] = field(default_factory=dict)
    groups_removed: dict[str, str] = field(default_factory=dict)
    group_ratio_changes: list[Change] = field(default_factory=list)
    scheduled: dict[str, datetime] = field(default_factory=dict)  # item: effective_from
    unchanged: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changes or self.groups_added
                    or self.groups_removed or self.group_ratio_changes)


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _ratios(ratios: Mapping[str, Decimal]) -> str:
    return ", ".join(f"{g} ×{_plain(r)}" for g, r in sorted(ratios.items())) or "none"


def _prices(price: Price) -> str:
    return "; ".join(price_lines(price))


def diff_catalog(current: Iterable[ItemState], current_groups: Mapping[str, Decimal],
                 catalog: Catalog) -> CatalogDiff:
    """Every difference between what is for sale now and ``catalog``, items in id order."""
    diff = CatalogDiff()
    before = {item.id: item for item in current}
    after = {listing.id: listing for listing in catalog.listings}
    diff.added = sorted(set(after) - set(before))
    diff.removed = sorted(set(before) - set(after))
    for item_id in sorted(set(before) & set(after)):
        changes = _item_changes(before[item_id], after[item_id])
        diff.changes.extend(changes)
        if not changes:
            diff.unchanged.append(item_id)
    for item_id, listing in sorted(after.items()):
        if listing.effective_from is not None:
            diff.scheduled[item_id] = listing.effective_from
    for name in sorted(set(catalog.groups) - set(current_groups)):
        diff.groups_added[name] = _plain(catalog.groups[name])
    for name in sorted(set(current_groups) - set(catalog.groups)):
        diff.groups_removed[name] = _plain(current_groups[name])
    for name in sorted(set(catalog.groups) & set(current_groups)):
        old, new = current_groups[name], catalog.groups[name]
        if old != new:
            diff.group_ratio_changes.append(Change(name, "ratio", _plain(old), _plain(new)))
    return diff


def _item_changes(old: ItemState, new: Listing) -> list[Change]:
    found: list[Change] = []
    if old.billing_type != new.billing_type:
        found.append(Change(old.id, "billing type", old.billing_type, new.billing_type))
    if old.price != new.price:
        found.append(Change(old.id, "price", _prices(old.price), _prices(new.price)))
    if dict(old.group_ratios) != dict(new.group_ratios):
        found.append(Change(old.id, "group ratios", _ratios(old.group_ratios),
                            _ratios(new.group_ratios)))
    if old.provider != new.provider:
        found.append(Change(old.id, "provider", old.provider, new.provider))
    was, spec = old.spec.as_dict(), new.spec.as_dict()
    for key in sorted(set(was) | set(spec)):
        if was.get(key) != spec.get(key):
            found.append(Change(old.id, key.replace("_", " "), _text(was.get(key)),
                                _text(spec.get(key))))
    return found


def _text(value: Any) -> str:
    """Attributes as an operator reads them: ``openai: a, anthropic: b`` for a model's
    per-protocol providers, ``/v1/embeddings, /v1/chat/completions`` for its routes."""
    if value is None:
        return "—"
    if isinstance(value, list) and value and all(
            isinstance(v, Mapping) and "provider" in v for v in value):  # channels
        return "; ".join(_channel_text(v) for v in value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _channel_text(channel: Mapping[str, Any]) -> str:
    """``openai-a (priority 0, weight 3, model gpt-x, cost input 2, output 8)``."""
    parts = [f"priority {channel.get('priority', 0)}", f"weight {channel.get('weight', 1)}"]
    if channel.get("upstream_model"):
        parts.append(f"model {channel['upstream_model']}")
    if channel.get("cost"):
        parts.append("cost " + ", ".join(f"{k} {v}" for k, v in channel["cost"].items()))
    return f"{channel['provider']} ({', '.join(parts)})"
