"""The stored catalog: providers, groups, items and their price versions.

``apply_catalog`` never rewrites a price: a changed price becomes a new version with an
effective-from time, and every earlier version is kept so usage rated with it stays
explainable.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.errors import CatalogError
from tollway.money import nano_to_decimal, parse_usd
from tollway.pricing.catalog import (
    KIND_PROTOCOLS,
    Catalog,
    ItemSpec,
    Listing,
    Provider,
    Tier,
    model_routes,
)
from tollway.pricing.rating import CallPrice, Price, TokenPrice
from tollway.store.tables import (
    accounts,
    api_keys,
    catalog_items,
    groups,
    price_versions,
    providers,
    tiers,
)


@dataclass(frozen=True, slots=True)
class PriceVersion:
    id: int
    item_id: str
    price: Price
    group_ratios: dict[str, Decimal]
    effective_from_ms: int


@dataclass(frozen=True, slots=True)
class Item:
    """A catalog item with the price version in effect."""

    id: str
    billing_type: str
    provider: str
    spec: ItemSpec
    version: PriceVersion


@dataclass
class ApplyReport:
    new_versions: list[tuple[str, int]] = field(default_factory=list)  # (item id, effective ms)
    unchanged: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)


#: A price version's JSON columns, not copied onto usage records.
PRICE_JSON_COLUMNS = ("per_size_nano", "tool_calls_nano", "per_quality_nano")


def price_columns(price: Price, *, unit_price: Decimal | None = None) -> dict[str, int | None]:
    """A price as a usage record's nano-USD columns, with the prices actually applied: a
    missing cache price is its fallback's (see rating), and a per-call item's unit price is
    ``unit_price`` when given (an image size's)."""
    if isinstance(price, TokenPrice):
        return dict(_token_price_columns(price))  # every request's record: computed once
    columns: dict[str, int | None] = {k: v for k, v in _price_columns(price).items()
                                      if k not in PRICE_JSON_COLUMNS and not isinstance(v, str)}
    if unit_price is not None:
        columns["per_call_nano"] = parse_usd(unit_price)
    return columns


@functools.lru_cache(maxsize=4096)
def _token_price_columns(price: TokenPrice) -> dict[str, int | None]:
    columns: dict[str, int | None] = {k: v for k, v in _price_columns(price).items()
                                      if k not in PRICE_JSON_COLUMNS and not isinstance(v, str)}
    columns["cache_read_nano_per_1m"] = parse_usd(price.effective_cache_read_per_1m)
    columns["cache_write_nano_per_1m"] = parse_usd(price.effective_cache_write_per_1m)
    columns["cache_write_1h_nano_per_1m"] = parse_usd(price.effective_cache_write_1h_per_1m)
    return columns


def _price_columns(price: Price) -> dict[str, int | str | None]:
    """A price version's columns, as the catalog file gave it (no fallbacks applied)."""
    def nano(value: Decimal | None) -> int | None:
        return None if value is None else parse_usd(value)

    columns: dict[str, int | str | None] = {
        "input_nano_per_1m": None, "output_nano_per_1m": None, "cache_read_nano_per_1m": None,
        "cache_write_nano_per_1m": None, "cache_write_1h_nano_per_1m": None,
        "per_call_nano": None, "per_size_nano": None, "tool_calls_nano": None,
        "per_quality_nano": None}
    if isinstance(price, TokenPrice):
        columns.update({"input_nano_per_1m": nano(price.input_per_1m),
                        "output_nano_per_1m": nano(price.output_per_1m),
                        "cache_read_nano_per_1m": nano(price.cache_read_per_1m),
                        "cache_write_nano_per_1m": nano(price.cache_write_per_1m),
                        "cache_write_1h_nano_per_1m": nano(price.cache_write_1h_per_1m)})
        if price.tool_calls:
            columns["tool_calls_nano"] = json.dumps(
                {tool: parse_usd(value) for tool, value in price.tool_calls}, sort_keys=True)
    else:
        columns["per_call_nano"] = nano(price.per_call)
        if price.per_size:
            columns["per_size_nano"] = json.dumps(
                {size: parse_usd(value) for size, value in price.per_size.items()},
                sort_keys=True)
        if price.per_quality:
            columns["per_quality_nano"] = json.dumps(
                {quality: parse_usd(value) for quality, value in price.per_quality.items()},
                sort_keys=True)
    return columns


def _ratios_json(ratios: dict[str, Decimal] | Any) -> str:
    return json.dumps({k: str(v) for k, v in sorted(ratios.items())})


def _version(row: sa.Row[tuple[object, ...]]) -> PriceVersion:
    def usd(nano: int | None) -> Decimal | None:
        return None if nano is None else nano_to_decimal(nano)

    price: Price
    if row.billing_type == "token":
        tools = json.loads(row.tool_calls_nano) if row.tool_calls_nano else {}
        price = TokenPrice(nano_to_decimal(row.input_nano_per_1m),
                           nano_to_decimal(row.output_nano_per_1m),
                           usd(row.cache_read_nano_per_1m), usd(row.cache_write_nano_per_1m),
                           usd(row.cache_write_1h_nano_per_1m),
                           tuple(sorted((tool, nano_to_decimal(nano))
                                        for tool, nano in tools.items())))
    else:
        sizes = json.loads(row.per_size_nano) if row.per_size_nano else {}
        qualities = json.loads(row.per_quality_nano) if row.per_quality_nano else {}
        price = CallPrice(nano_to_decimal(row.per_call_nano),
                          {size: nano_to_decimal(nano) for size, nano in sizes.items()},
                          {quality: nano_to_decimal(nano) for quality, nano in qualities.items()})
    return PriceVersion(row.id, row.item_id, price, _ratios(row.group_ratios),
                        row.effective_from_ms)


def apply_catalog(conn: Connection, catalog: Catalog, *, now_ms: int) -> ApplyReport:
    report = ApplyReport()
    _apply_groups(conn, catalog, report)
    conn.execute(tiers.delete())
    if catalog.tiers:
        conn.execute(tiers.insert(), [
            {"name": t.name, "position": i, "rpm": t.rpm, "tpm": t.tpm,
             "concurrency": t.concurrency, "upgrade_at_nano": t.upgrade_at_nano,
             "is_default": t.name == catalog.default_tier}
            for i, t in enumerate(catalog.tiers)])
    conn.execute(providers.delete())
    if catalog.providers:
        conn.execute(providers.insert(), [
            {"id": p.id, "kind": p.kind, "config": json.dumps(_provider_config(p))}
            for p in catalog.providers.values()])
    existing = {r.id: r for r in conn.execute(sa.select(catalog_items))}
    for listing in catalog.listings:
        values = {"billing_type": listing.billing_type, "provider": listing.provider,
                  "spec": json.dumps(listing.spec.as_dict(), sort_keys=True), "active": True,
                  "updated_at_ms": now_ms}
        if listing.id in existing:
            conn.execute(catalog_items.update().where(catalog_items.c.id == listing.id)
                         .values(**values))
        else:
            conn.execute(catalog_items.insert().values(id=listing.id, **values))
        _apply_price(conn, listing, now_ms, report)
    listed = {item.id for item in catalog.listings}
    for item_id, row in existing.items():
        if item_id not in listed and row.active:
            conn.execute(catalog_items.update().where(catalog_items.c.id == item_id)
                         .values(active=False, updated_at_ms=now_ms))
            report.deactivated.append(item_id)
    return report


def _provider_config(provider: Provider) -> dict[str, Any]:
    config: dict[str, Any] = {"base_url": provider.base_url, "api_key_env": provider.api_key_env,
              "auth": dict(provider.auth)}
    if provider.api_key_envs:
        config["api_key_envs"] = list(provider.api_key_envs)
    if provider.health_path:
        config["health_path"] = provider.health_path
    return config


def _apply_groups(conn: Connection, catalog: Catalog, report: ApplyReport) -> None:
    stored = {r.name: r.ratio for r in conn.execute(sa.select(groups))}
    for name in sorted(set(stored) - set(catalog.groups)):
        users = conn.execute(sa.select(sa.func.count()).select_from(accounts)
                             .where(accounts.c.group_name == name)).scalar_one()
        users += conn.execute(sa.select(sa.func.count()).select_from(api_keys)
                              .where(api_keys.c.group_name == name)).scalar_one()
        if users:
            raise CatalogError([(f"group {name!r} is missing from the file but {users} "
                                 "accounts or keys belong to it: keep it or move them first")])
        conn.execute(groups.delete().where(groups.c.name == name))
    for name, ratio in catalog.groups.items():
        if name not in stored:
            conn.execute(groups.insert().values(name=name, ratio=str(ratio)))
        elif Decimal(stored[name]) != ratio:
            conn.execute(groups.update().where(groups.c.name == name).values(ratio=str(ratio)))
        report.groups[name] = str(ratio)


def _apply_price(conn: Connection, listing: Listing, now_ms: int, report: ApplyReport) -> None:
    columns = _price_columns(listing.price)
    effective_ms = (now_ms if listing.effective_from is None
                    else int(listing.effective_from.timestamp() * 1000))

    def in_effect_at(ms: int) -> sa.Row[Any] | None:
        return conn.execute(
            sa.select(price_versions).where(price_versions.c.item_id == listing.id,
                                            price_versions.c.effective_from_ms <= ms)
            .order_by(price_versions.c.effective_from_ms.desc(), price_versions.c.id.desc())
            .limit(1)).first()

    # Compare with the version that would be in effect when this one starts (not with the
    # newest version: a scheduled future version must not make every re-apply add a copy).
    base = in_effect_at(effective_ms)
    if base is not None and base.billing_type == listing.billing_type \
            and all(getattr(base, k) == v for k, v in columns.items()) \
            and _ratios(base.group_ratios) == dict(listing.group_ratios):
        report.unchanged.append(listing.id)
        return
    current = in_effect_at(now_ms)
    if current is not None and effective_ms < current.effective_from_ms:
        raise CatalogError([(f"{listing.id}.effective_from: {_iso(effective_ms)} is before the "
                             f"price in effect since {_iso(current.effective_from_ms)}, so the "
                             "new price would never apply: give a later effective_from")])
    conn.execute(price_versions.insert().values(
        item_id=listing.id, billing_type=listing.billing_type,
        group_ratios=_ratios_json(listing.group_ratios), effective_from_ms=effective_ms,
        created_at_ms=now_ms, **columns))
    report.new_versions.append((listing.id, effective_ms))


def _ratios(stored: str) -> dict[str, Decimal]:
    """Stored group-ratio overrides as numbers ("0.70" and "0.7" are the same ratio)."""
    return {k: Decimal(v) for k, v in json.loads(stored).items()}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def current_items(conn: Connection, *, now_ms: int, item_id: str | None = None) -> list[Item]:
    """Active items with the price version in effect at ``now_ms`` (newest effective-from at or
    before it); items whose first price starts in the future are not yet for sale."""
    latest = (sa.select(price_versions.c.item_id,
                        sa.func.max(price_versions.c.effective_from_ms).label("eff"))
              .where(price_versions.c.effective_from_ms <= now_ms)
              .group_by(price_versions.c.item_id).subquery())
    query = (sa.select(catalog_items.c.provider, catalog_items.c.spec, price_versions)
             .join(latest, latest.c.item_id == catalog_items.c.id)
             .join(price_versions, sa.and_(price_versions.c.item_id == latest.c.item_id,
                                           price_versions.c.effective_from_ms == latest.c.eff))
             .where(catalog_items.c.active.is_(True))
             .order_by(price_versions.c.billing_type.desc(), price_versions.c.item_id,
                       price_versions.c.id))
    if item_id is not None:
        query = query.where(catalog_items.c.id == item_id)
    items: dict[str, Item] = {}
    for row in conn.execute(query):  # the last row wins when two versions share a time
        items[row.item_id] = Item(row.item_id, row.billing_type, row.provider,
                                  ItemSpec.from_dict(json.loads(row.spec)), _version(row))
    return list(items.values())


def endpoint_ids(conn: Connection) -> list[str]:
    """Every item ever listed as a data-API endpoint (sold now or not): what sets an
    endpoint apart from an image model, both billed per call."""
    rows = conn.execute(sa.select(catalog_items.c.id, catalog_items.c.spec)
                        .where(catalog_items.c.billing_type == "per_call"))
    return sorted(row.id for row in rows
                  if ItemSpec.from_dict(json.loads(row.spec)).is_endpoint)


def price_history(conn: Connection, item_id: str) -> list[PriceVersion]:
    rows = conn.execute(sa.select(price_versions).where(price_versions.c.item_id == item_id)
                        .order_by(price_versions.c.effective_from_ms, price_versions.c.id))
    return [_version(r) for r in rows]


def group_ratios(conn: Connection) -> dict[str, Decimal]:
    ratios = {r.name: Decimal(r.ratio) for r in conn.execute(sa.select(groups))}
    ratios.setdefault("default", Decimal(1))
    return ratios


def item_protocols(item: Item, kinds: dict[str, str]) -> dict[str, str]:
    """A model's ``{protocol family: provider id}``; items applied before protocols were
    stored serve every protocol of their provider's kind (``kinds``: provider id → kind)."""
    stored = item.spec.providers
    if stored is not None:
        return dict(stored)
    return {family: item.provider for family in KIND_PROTOCOLS.get(kinds.get(item.provider, ""),
                                                                   ())}


def item_routes(item: Item, protocols: dict[str, str]) -> list[str]:
    """The gateway routes a model is sold on: its ``routes`` if the catalog narrows them, else
    every route of its protocols."""
    narrowed = item.spec.routes
    if narrowed is not None:
        return list(narrowed)
    return model_routes(item.billing_type, protocols)


def list_providers(conn: Connection) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{provider id: (kind, config)}`` as applied from the catalog file."""
    return {r.id: (r.kind, json.loads(r.config)) for r in conn.execute(sa.select(providers))}


def list_tiers(conn: Connection) -> tuple[tuple[Tier, ...], str | None]:
    """The applied tiers, lowest first, and the default tier's name (None: no tiers)."""
    rows = list(conn.execute(sa.select(tiers).order_by(tiers.c.position)))
    default = next((r.name for r in rows if r.is_default), None)
    return (tuple(Tier(r.name, r.rpm, r.tpm, r.concurrency, r.upgrade_at_nano) for r in rows),
            default)
