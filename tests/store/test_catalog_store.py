"""The stored catalog on SQLite and PostgreSQL: price versions, history, deactivation, groups.

Times are passed explicitly (``now_ms``), so "now", "later" and "in the future" are exact.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tollway.errors import CatalogError
from tollway.pricing.catalog import ItemSpec, load_catalog, parse_catalog
from tollway.pricing.rating import CallPrice, TokenPrice
from tollway.store import accounts as store
from tollway.store.catalog import ApplyReport, apply_catalog, current_items, price_history
from tollway.store.db import Database
from tollway.store.tables import catalog_items, groups, price_versions

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
ITEMS = {"sandbox-chat", "sandbox-reasoner", "sandbox-embed", "sandbox-claude",
         "sandbox-image", "web-search", "stock-quote",
         "scholar-search"}
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
HOUR = 3_600_000
DAY = 24 * HOUR


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat()


def catalog(*, chat_input: str = '"0.15"', chat_extra: str = "group_ratios: {vip: \"0.7\"}",
            groups_yaml: str = 'vip: {ratio: "0.8"}', stock_quote: bool = True) -> str:
    """A small catalog: one model with an override, two endpoints."""
    text = f"""\
providers:
  sandbox: {{kind: sandbox}}
groups:
  default: {{ratio: "1"}}
  {groups_yaml}
models:
  - id: sandbox-chat
    provider: sandbox
    price: {{input: {chat_input}, output: "0.60", cache_read: "0.075"}}
    {chat_extra}
endpoints:
  - id: web-search
    provider: sandbox
    path: /search/web
    price: {{per_call: "0.002"}}
"""
    if stock_quote:
        text += """\
  - id: stock-quote
    provider: sandbox
    path: /finance/quote/{symbol}
    price: {per_call: "0.0005"}
"""
    return text


def apply(db: Database, text: str, now_ms: int) -> ApplyReport:
    with db.write() as conn:
        return apply_catalog(conn, parse_catalog(text, source="test.yaml"), now_ms=now_ms)


def current(db: Database, now_ms: int) -> dict[str, Any]:
    with db.read() as conn:
        return {item.id: item for item in current_items(conn, now_ms=now_ms)}


def history(db: Database, item_id: str) -> list[Any]:
    with db.read() as conn:
        return price_history(conn, item_id)


def version_count(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(price_versions))
                   .scalar_one())


def test_first_apply_stores_one_version_per_item_and_reapply_adds_none(db: Database) -> None:
    with db.write() as conn:
        report = apply_catalog(conn, load_catalog(CATALOG), now_ms=T0)
    assert sorted(report.new_versions) == sorted((item, T0) for item in ITEMS)
    assert report.unchanged == [] and report.deactivated == []
    assert report.groups == {"default": "1", "vip": "0.8"}
    assert version_count(db) == 8
    for item in ITEMS:
        assert len(history(db, item)) == 1

    items = current(db, T0)
    assert items.keys() == ITEMS
    chat = items["sandbox-chat"]
    assert (chat.billing_type, chat.provider) == ("token", "sandbox")
    assert chat.version.price == TokenPrice(Decimal("0.15"), Decimal("0.60"), Decimal("0.075"),
                                            None)
    assert chat.version.group_ratios == {"vip": Decimal("0.7")}
    assert chat.version.effective_from_ms == T0
    assert chat.spec.max_output_tokens == 4096
    reasoner = items["sandbox-reasoner"].version.price
    assert isinstance(reasoner, TokenPrice)
    assert reasoner.cache_write_per_1m == Decimal("3.125")
    # written as YAML numbers (0.02 and 0): read exactly
    assert items["sandbox-embed"].version.price == TokenPrice(Decimal("0.02"), Decimal(0),
                                                              None, None)
    assert items["stock-quote"].version.price == CallPrice(Decimal("0.0005"))
    assert items["stock-quote"].billing_type == "per_call"
    assert items["stock-quote"].spec.path == "/finance/quote/{symbol}"

    with db.write() as conn:
        again = apply_catalog(conn, load_catalog(CATALOG), now_ms=T0 + HOUR)
    assert again.new_versions == [] and again.deactivated == []
    assert sorted(again.unchanged) == sorted(ITEMS)
    assert version_count(db) == 8
    assert current(db, T0 + HOUR)["sandbox-chat"].version.effective_from_ms == T0
    # nothing was for sale before the first version
    assert current(db, T0 - 1) == {}


def test_a_changed_price_is_one_new_version_and_history_stays(db: Database) -> None:
    apply(db, catalog(), T0)
    report = apply(db, catalog(chat_input="0.2009"), T0 + HOUR)  # a YAML number, read exactly
    assert report.new_versions == [("sandbox-chat", T0 + HOUR)]
    assert sorted(report.unchanged) == ["stock-quote", "web-search"]
    assert version_count(db) == 4

    old, new = history(db, "sandbox-chat")
    assert isinstance(old.price, TokenPrice) and isinstance(new.price, TokenPrice)
    assert (old.price.input_per_1m, old.effective_from_ms) == (Decimal("0.15"), T0)
    assert (new.price.input_per_1m, new.effective_from_ms) == (Decimal("0.2009"), T0 + HOUR)
    assert new.price.output_per_1m == old.price.output_per_1m == Decimal("0.60")
    assert new.id != old.id

    now = current(db, T0 + HOUR)["sandbox-chat"].version
    assert now.id == new.id
    assert isinstance(now.price, TokenPrice)
    assert now.price.input_per_1m == Decimal("0.2009")
    assert str(now.price.input_per_1m.normalize()) == "0.2009"
    # the price in effect before the change is still the old one
    assert current(db, T0 + HOUR - 1)["sandbox-chat"].version.id == old.id
    # the untouched items keep their single version
    assert [v.effective_from_ms for v in history(db, "web-search")] == [T0]

    assert apply(db, catalog(chat_input="0.2009"), T0 + 2 * HOUR).new_versions == []
    # a price spelled differently but equal is not a change
    assert apply(db, catalog(chat_input='"0.200900"'), T0 + 3 * HOUR).new_versions == []
    assert version_count(db) == 4


def test_a_future_effective_from_keeps_the_old_price_until_then(db: Database) -> None:
    apply(db, catalog(), T0)
    starts = T0 + DAY
    text = catalog(chat_input='"0.2009"',
                   chat_extra=f'group_ratios: {{vip: "0.7"}}\n    effective_from: "{iso(starts)}"')
    report = apply(db, text, T0 + HOUR)
    assert report.new_versions == [("sandbox-chat", starts)]

    def input_price(at: int) -> Decimal:
        price = current(db, at)["sandbox-chat"].version.price
        assert isinstance(price, TokenPrice)
        return price.input_per_1m

    assert input_price(T0 + HOUR) == Decimal("0.15")
    assert input_price(starts - 1) == Decimal("0.15")
    assert input_price(starts) == Decimal("0.2009")
    assert input_price(starts + DAY) == Decimal("0.2009")

    # applying the same file again, before or after the change starts, adds nothing
    for at in (T0 + 2 * HOUR, starts + HOUR):
        again = apply(db, text, at)
        assert again.new_versions == [] and "sandbox-chat" in again.unchanged
    # nor does applying the current price again while the change is scheduled
    assert apply(db, catalog(), T0 + 3 * HOUR).new_versions == []
    assert apply(db, catalog(), T0 + 4 * HOUR).new_versions == []
    assert [v.effective_from_ms for v in history(db, "sandbox-chat")] == [T0, starts]


def test_a_new_item_with_a_future_effective_from_is_not_for_sale_yet(db: Database) -> None:
    apply(db, catalog(), T0)
    later = catalog() + f"""\
  - id: scholar-search
    provider: sandbox
    method: POST
    path: /scholar/search
    effective_from: "{iso(T0 + DAY)}"
    price: {{per_call: "0.02"}}
"""
    assert apply(db, later, T0 + HOUR).new_versions == [("scholar-search", T0 + DAY)]
    assert "scholar-search" not in current(db, T0 + HOUR)
    assert current(db, T0 + DAY)["scholar-search"].version.price == CallPrice(Decimal("0.02"))


def test_a_price_change_backdated_before_the_current_price_is_refused(db: Database) -> None:
    apply(db, catalog(), T0)
    text = catalog(chat_input='"0.2009"',
                   chat_extra=f'effective_from: "{iso(T0 - DAY)}"')
    with pytest.raises(CatalogError) as raised:
        apply(db, text, T0 + HOUR)
    assert "sandbox-chat.effective_from" in str(raised.value)
    assert version_count(db) == 3
    price = current(db, T0 + HOUR)["sandbox-chat"].version.price
    assert isinstance(price, TokenPrice) and price.input_per_1m == Decimal("0.15")


def test_an_item_removed_from_the_file_is_deactivated_and_keeps_its_history(
        db: Database) -> None:
    apply(db, catalog(), T0)
    report = apply(db, catalog(stock_quote=False), T0 + HOUR)
    assert report.deactivated == ["stock-quote"] and report.new_versions == []
    assert "stock-quote" not in current(db, T0 + HOUR)
    assert current(db, T0 + HOUR).keys() == {"sandbox-chat", "web-search"}
    (kept,) = history(db, "stock-quote")
    assert (kept.price, kept.effective_from_ms) == (CallPrice(Decimal("0.0005")), T0)

    assert apply(db, catalog(stock_quote=False), T0 + 2 * HOUR).deactivated == []
    # listed again at the same price: for sale again, no new version
    back = apply(db, catalog(), T0 + 3 * HOUR)
    assert back.new_versions == [] and "stock-quote" in back.unchanged
    assert current(db, T0 + 3 * HOUR)["stock-quote"].version.id == kept.id


def _state(db: Database) -> tuple[Any, ...]:
    with db.read() as conn:
        return (sorted(conn.execute(sa.select(groups)).all()), version_count(db),
                sorted(conn.execute(sa.text("SELECT id, active FROM catalog_items")).all()))


@pytest.mark.parametrize("user", ["account", "key"])
def test_removing_a_group_in_use_raises_and_writes_nothing(db: Database, user: str) -> None:
    apply(db, catalog(groups_yaml='vip: {ratio: "0.8"}\n  spare: {ratio: "0.9"}'), T0)
    with db.write() as conn:
        account = store.create_account(conn, "alice", "vip" if user == "account" else "default",
                                       at_ms=T0)
        if user == "key":
            store.insert_key(conn, account_id=account.id, prefix="tw-x", key_hash="0" * 64,
                             name=None, group="vip", models=None, quota_nano=None,
                             expires_at_ms=None, at_ms=T0)
    before = _state(db)
    # drops vip (in use) and spare (unused), changes a price and removes an item
    text = catalog(chat_input='"0.2009"', chat_extra="", groups_yaml="",
                   stock_quote=False)
    with pytest.raises(CatalogError) as raised:
        apply(db, text, T0 + HOUR)
    assert "group 'vip' is missing from the file but 1 accounts or keys belong to it" in str(
        raised.value)
    assert _state(db) == before
    assert current(db, T0 + HOUR).keys() == {"sandbox-chat", "web-search", "stock-quote"}

    # removing only the unused group works
    report = apply(db, catalog(groups_yaml='vip: {ratio: "0.8"}'), T0 + 2 * HOUR)
    assert report.groups == {"default": "1", "vip": "0.8"}
    with db.read() as conn:
        assert sorted(conn.execute(sa.select(groups.c.name)).scalars()) == ["default", "vip"]


def test_a_group_ratio_override_change_is_a_new_version(db: Database) -> None:
    apply(db, catalog(), T0)
    report = apply(db, catalog(chat_extra='group_ratios: {vip: "0.75"}'), T0 + HOUR)
    assert report.new_versions == [("sandbox-chat", T0 + HOUR)]
    old, new = history(db, "sandbox-chat")
    assert old.group_ratios == {"vip": Decimal("0.7")}
    assert new.group_ratios == {"vip": Decimal("0.75")}
    assert new.price == old.price
    assert current(db, T0 + HOUR)["sandbox-chat"].version.group_ratios == {
        "vip": Decimal("0.75")}

    # the same ratio written differently is not a change
    assert apply(db, catalog(chat_extra="group_ratios: {vip: 0.750}"),
                 T0 + 2 * HOUR).new_versions == []
    # dropping the override is a change
    assert apply(db, catalog(chat_extra=""), T0 + 3 * HOUR).new_versions == [
        ("sandbox-chat", T0 + 3 * HOUR)]
    assert current(db, T0 + 3 * HOUR)["sandbox-chat"].version.group_ratios == {}
    assert len(history(db, "sandbox-chat")) == 3

    # a group's own ratio is not versioned: it changes in place
    report = apply(db, catalog(chat_extra="", groups_yaml='vip: {ratio: "0.85"}'),
                   T0 + 4 * HOUR)
    assert report.new_versions == [] and report.groups["vip"] == "0.85"


#: The item specs as stored before ItemSpec existed (issue 16): rows already in a database
#: must read back, and applying the same file must write the very same text.
STORED_SPECS = {
    "sandbox-embed": '{"max_output_tokens": 1, "providers": {"anthropic": "sandbox", "openai": '
                     '"sandbox"}, "routes": ["/v1/embeddings"], "upstream_model": '
                     '"sandbox-embed"}',
    "sandbox-image": '{"providers": {"anthropic": "sandbox", "openai": "sandbox"}, '
                     '"upstream_model": "sandbox-image"}',
    "stock-quote": '{"method": "GET", "name": "Stock quote", "path": "/finance/quote/{symbol}", '
                   '"upstream_path": "/finance/quote/{symbol}"}',
}


def test_item_spec_is_stored_byte_compatible(db: Database) -> None:
    with db.write() as conn:
        apply_catalog(conn, load_catalog(CATALOG), now_ms=T0)
        stored = {r.id: r.spec for r in conn.execute(sa.select(catalog_items))}
    for item_id, text in STORED_SPECS.items():
        assert stored[item_id] == text
    items = current(db, T0)
    embed = items["sandbox-embed"].spec
    assert embed == ItemSpec(upstream_model="sandbox-embed", max_output_tokens=1,
                             providers={"anthropic": "sandbox", "openai": "sandbox"},
                             routes=("/v1/embeddings",))
    quote = items["stock-quote"].spec
    assert (quote.method, quote.path, quote.is_endpoint) == ("GET", "/finance/quote/{symbol}",
                                                             True)
    for item in items.values():
        assert json.dumps(item.spec.as_dict(), sort_keys=True) == stored[item.id]
