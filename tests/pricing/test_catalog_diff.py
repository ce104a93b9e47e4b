"""The catalog diff the operator reads before applying a file: pure, exact, complete."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from tollway.pricing.catalog import Catalog, ItemSpec, Listing, parse_catalog
from tollway.pricing.diff import Change, ItemState, diff_catalog
from tollway.pricing.rating import CallPrice, TokenPrice


def state_of(listing: Listing) -> ItemState:
    """What the store would hold after applying ``listing``."""
    return ItemState(listing.id, listing.billing_type, listing.provider, listing.price,
                     dict(listing.group_ratios), listing.spec)


BASE = parse_catalog("""
providers: {sandbox: {kind: sandbox}}
groups: {vip: {ratio: "0.8"}}
models:
  - {id: chat, provider: sandbox, price: {input: "0.15", output: "0.60"},
     group_ratios: {vip: "0.7"}}
endpoints:
  - {id: quote, name: Quote, provider: sandbox, method: GET, path: "/quote/{symbol}",
     price: {per_call: "0.0005"}}
""")


def test_a_catalog_against_itself_has_no_changes() -> None:
    diff = diff_catalog([state_of(x) for x in BASE.listings], BASE.groups, BASE)
    assert diff.empty
    assert diff.unchanged == ["chat", "quote"]


def test_every_kind_of_change_with_old_and_new_values() -> None:
    new = parse_catalog("""
providers: {sandbox: {kind: sandbox}, other: {kind: sandbox}}
groups: {vip: {ratio: "0.75"}, gold: {ratio: "0.5"}}
models:
  - {id: chat, provider: other, price: {input: "0.150", output: "0.60", cache_read: "0.075"},
     max_output_tokens: 2048}
endpoints:
  - {id: weather, provider: sandbox, path: /weather, price: {per_call: "0.001"},
     effective_from: "2030-01-01T00:00:00Z"}
""")
    groups = {"default": Decimal(1), "vip": Decimal("0.8"), "old": Decimal("2")}
    diff = diff_catalog([state_of(x) for x in BASE.listings], groups, new)
    assert diff.added == ["weather"]
    assert diff.removed == ["quote"]
    assert diff.changes == [
        Change("chat", "price",
               "$0.150000 / 1M input tokens; $0.600000 / 1M output tokens",
               "$0.150000 / 1M input tokens; $0.600000 / 1M output tokens; "
               "$0.075000 / 1M cached input tokens"),
        Change("chat", "group ratios", "vip ×0.7", "none"),
        Change("chat", "provider", "sandbox", "other"),
        Change("chat", "max output tokens", "4096", "2048"),
        # a sandbox provider speaks both protocol families; the model follows its provider
        Change("chat", "providers", "openai: sandbox, anthropic: sandbox",
               "openai: other, anthropic: other"),
    ]
    assert diff.groups_added == {"gold": "0.5"}
    assert diff.groups_removed == {"old": "2"}
    assert diff.group_ratio_changes == [Change("vip", "ratio", "0.8", "0.75")]
    assert [str(v.date()) for v in diff.scheduled.values()] == ["2030-01-01"]
    assert diff.unchanged == []


prices = st.decimals(min_value=0, max_value=1000, places=9, allow_nan=False,
                     allow_infinity=False)


@st.composite
def listings(draw: st.DrawFn) -> Listing:
    item_id = draw(st.sampled_from(["a", "b", "c", "d", "e"]))
    if draw(st.booleans()):
        return Listing(item_id, "p", TokenPrice(draw(prices), draw(prices)), {}, None,
                       ItemSpec(upstream_model=item_id, max_output_tokens=16))
    return Listing(item_id, "p", CallPrice(draw(prices)), {}, None, ItemSpec(
        name=item_id, method="GET", path=f"/{item_id}", upstream_path=f"/{item_id}"))


def catalog(items: list[Listing]) -> Catalog:
    unique = {x.id: x for x in items}
    return Catalog({}, {"default": Decimal(1)}, tuple(unique.values()))


@given(st.lists(listings(), max_size=5), st.lists(listings(), max_size=5))
def test_every_item_is_added_removed_changed_or_unchanged(old: list[Listing],
                                                          new: list[Listing]) -> None:
    before, after = catalog(old), catalog(new)
    diff = diff_catalog([state_of(x) for x in before.listings], before.groups, after)
    old_ids = {x.id for x in before.listings}
    new_ids = {x.id for x in after.listings}
    assert set(diff.added) == new_ids - old_ids
    assert set(diff.removed) == old_ids - new_ids
    changed = {c.item for c in diff.changes}
    assert changed | set(diff.unchanged) == old_ids & new_ids
    assert not changed & set(diff.unchanged)
    for item_id in old_ids & new_ids:
        was = next(x for x in before.listings if x.id == item_id)
        now = next(x for x in after.listings if x.id == item_id)
        assert (item_id in changed) == (was.price != now.price or was.spec != now.spec)
    # applied, the new file has no changes left
    assert diff_catalog([state_of(x) for x in after.listings], after.groups, after).empty
