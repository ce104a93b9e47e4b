"""The operator's catalog pages: prices with their history, and a catalog file previewed
before it is applied.

A preview is exact about what the apply would write because it runs the apply itself
(``apply_catalog``, the code ``tollway catalog apply`` runs) inside a savepoint that is
rolled back: the new price versions it would create, and any refusal it would raise (a
removed group that accounts still use, an ``effective_from`` before the price in effect),
are the real ones. The diff beside it says what each change is, old value → new value.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy.engine import Connection

from tollway.errors import CatalogError
from tollway.pricing.catalog import Catalog
from tollway.pricing.diff import CatalogDiff, ItemState, diff_catalog
from tollway.store.catalog import (
    ApplyReport,
    Item,
    PriceVersion,
    apply_catalog,
    current_items,
    group_ratios,
    price_history,
)


@dataclass(frozen=True, slots=True)
class Preview:
    diff: CatalogDiff
    report: ApplyReport | None  # what the apply would write; None when it would be refused
    problems: list[str]  # why the apply would be refused


@dataclass(frozen=True, slots=True)
class PricedItem:
    item: Item
    history: list[PriceVersion]  # oldest first; the last one may start in the future


def state(item: Item) -> ItemState:
    return ItemState(item.id, item.billing_type, item.provider, item.version.price,
                     item.version.group_ratios, item.spec)


def current_state(conn: Connection, *, now_ms: int) -> tuple[list[ItemState],
                                                               dict[str, Decimal]]:
    return [state(i) for i in current_items(conn, now_ms=now_ms)], group_ratios(conn)


def preview(conn: Connection, catalog: Catalog, *, now_ms: int) -> Preview:
    """What applying ``catalog`` at ``now_ms`` would change; writes nothing."""
    items, groups = current_state(conn, now_ms=now_ms)
    diff = diff_catalog(items, groups, catalog)
    savepoint = conn.begin_nested()
    try:
        report: ApplyReport | None = apply_catalog(conn, catalog, now_ms=now_ms)
        problems: list[str] = []
    except CatalogError as exc:
        report, problems = None, list(exc.problems)
    finally:
        savepoint.rollback()
    return Preview(diff, report, problems)


def apply(conn: Connection, catalog: Catalog, *, now_ms: int) -> ApplyReport:
    return apply_catalog(conn, catalog, now_ms=now_ms)


def priced_items(conn: Connection, *, now_ms: int) -> list[PricedItem]:
    """Every item for sale with its price history (one indexed read per item)."""
    return [PricedItem(item, price_history(conn, item.id))
            for item in current_items(conn, now_ms=now_ms)]
