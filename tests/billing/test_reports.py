"""Usage log, summaries and statements on SQLite and PostgreSQL, from books written through the
real money path: ``metering.reserve`` → ``settle`` / ``void`` with records built by the
gateway's own ``Call.record``, top-ups and adjustments through ``billing.credits``, keys
through ``billing.keys``. A fixed clock (``tollway.clock.now_ms``
patched) places every record, hold and wallet movement at a known time.

Every expectation is computed here, by hand or from the raw records, never by the code under
test: filters and keyset pages return exactly the expected records (also while records
arrive between pages), each record's ``pricing`` recomputes to its cost, rollup summaries
equal sums over the raw records, and a two-month statement reconciles to the nano-dollar.

``test_reports_http.py`` and ``test_cli_reports.py`` reuse :class:`Books` from here.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

import pytest
import sqlalchemy as sa

import tollway.clock
from fakes import fresh_database
from tollway.billing import credits, metering
from tollway.billing import keys as key_ops
from tollway.billing.metering import Reservation
from tollway.billing.reports import (
    export_csv,
    export_jsonl,
    month_bounds,
    recharge,
    record_view,
    statement_csv,
    statement_view,
    summary_view,
)
from tollway.errors import InvalidRequest, UpstreamError
from tollway.gateway.calls import Call
from tollway.ledger import ledger
from tollway.ledger.verify import verify
from tollway.money import parse_signed_usd, parse_usd
from tollway.pricing.catalog import parse_catalog
from tollway.pricing.rating import (
    CallPrice,
    CallUsage,
    TokenUsage,
    resolve_ratio,
)
from tollway.runtime.errors import REQUEST_ID
from tollway.store import accounts as account_store
from tollway.store import reports as store
from tollway.store import usage as usage_store
from tollway.store.accounts import ApiKeyRecord
from tollway.store.catalog import apply_catalog, current_items, group_ratios
from tollway.store.db import Database
from tollway.store.reports import LogFilter
from tollway.store.tables import usage_records

NANO = 1_000_000_000
HOUR = 3_600_000
DAY = 86_400_000
MINUTE = 60_000
REQUEST_TYPES = ("consume", "error")
COUNTERS = ("requests", "errors", "input_tokens", "cached_input_tokens", "cache_write_tokens",
            "cache_write_1h_tokens",
            "output_tokens", "reasoning_tokens", "calls", "cost_nano")

CATALOG = """
providers:
  sandbox: {kind: sandbox}
groups:
  default: {ratio: "1"}
  vip:     {ratio: "0.8"}
  odd:     {ratio: "0.333"}
  half:    {ratio: "0.5"}
models:
  - id: chat-a
    provider: sandbox
    price: {input: "0.15", output: "0.60", cache_read: "0.075"}
    max_output_tokens: 4096
    group_ratios: {vip: "0.7"}
  - id: reasoner-b
    provider: sandbox
    price: {input: "2.50", output: "10.00", cache_read: "1.25", cache_write: "3.125"}
    max_output_tokens: 8192
endpoints:
  - id: search-c
    provider: sandbox
    method: GET
    path: /search/web
    price: {per_call: "0.002"}
    group_ratios: {vip: "0.5"}
  - id: quote-d
    provider: sandbox
    method: GET
    path: /finance/quote/{symbol}
    price: {per_call: "0.000001235"}
"""


ENDPOINTS = ("search-c", "quote-d")  # the catalog's endpoints; the rest are models


def ms(text: str) -> int:
    """Milliseconds of an ISO time written in UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(moment.astimezone(UTC).timestamp() * 1000)


# --------------------------------------------------------------------------- the books


class Clock:
    """The time every layer sees while books are written (see :func:`frozen`)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def __call__(self) -> int:
        return self.at

    def set(self, when: str | int) -> None:
        at = ms(when) if isinstance(when, str) else when
        assert at >= self.at, "the clock only moves forward"
        self.at = at

    def advance(self, milliseconds: int) -> None:
        self.at += milliseconds


@contextlib.contextmanager
def frozen(clock: Clock) -> Iterator[Clock]:
    """Patch the ledger's clock (holds, wallet days, credits) and the gateway's (the usage
    record's ``created_at_ms``)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tollway.clock, "now_ms", clock)
        yield clock


@dataclass
class Row:
    """A record the log must show, as the test wrote it."""

    request_id: str
    at: int
    account_id: int
    type: str
    key_id: int | None = None
    product: str | None = None
    billing_type: str | None = None
    group: str | None = None
    cost_nano: int = 0
    credit_nano: int = 0


@dataclass
class Books:
    db: Database
    clock: Clock
    rows: list[Row] = field(default_factory=list)  # in the order they were written (ids)
    accounts: dict[str, int] = field(default_factory=dict)
    keys: dict[str, ApiKeyRecord] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    tags: dict[str, Row] = field(default_factory=dict)
    _n: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def catalog(self, text: str = CATALOG) -> None:
        with self.db.write() as conn:
            apply_catalog(conn, parse_catalog(text), now_ms=self.clock())

    def account(self, name: str, group: str = "default") -> int:
        with self.db.write() as conn:
            self.accounts[name] = account_store.create_account(conn, name, group,
                                                               at_ms=self.clock()).id
        return self.accounts[name]

    def topup(self, account: str, usd: str) -> Row:
        amount = parse_usd(usd)
        with self.db.write() as conn:
            result = credits.topup(conn, self.accounts[account], amount,
                                   idempotency_key=f"topup-{next(self._n)}", note=f"top-up {usd}",
                                   at_ms=tollway.clock.now_ms())
        return self._add(Row(f"entry-{result.entry_id}", self.clock(), self.accounts[account],
                             "topup", credit_nano=amount))

    def adjust(self, account: str, usd: str) -> Row:
        amount = parse_signed_usd(usd)
        with self.db.write() as conn:
            result = credits.adjust(conn, self.accounts[account], amount,
                                    idempotency_key=f"adjust-{next(self._n)}",
                                    note=f"adjustment {usd}", at_ms=tollway.clock.now_ms())
        return self._add(Row(f"entry-{result.entry_id}", self.clock(), self.accounts[account],
                             "adjustment", credit_nano=amount))

    def key(self, account: str, name: str, group: str | None = None) -> ApiKeyRecord:
        with self.db.write() as conn:
            new = key_ops.create_key(conn, self.accounts[account], at_ms=self.clock(),
                                     name=name, group=group)
        self.keys[name], self.secrets[name] = new.record, new.secret
        self._add(Row(f"key-{new.record.id}-created", self.clock(), new.record.account_id,
                      "system", key_id=new.record.id))
        return new.record

    def revoke(self, name: str) -> None:
        key = self.keys[name]
        with self.db.write() as conn:
            key_ops.revoke_key(conn, key.id, at_ms=self.clock())
        self._add(Row(f"key-{key.id}-revoked", self.clock(), key.account_id, "system",
                      key_id=key.id))

    def request(self, key_name: str, product: str, *, prompt: int = 0, completion: int = 0,
                cached: int = 0, cache_write: int = 0, reasoning: int = 0, fail: bool = False,
                hold_nano: int | None = None, tag: str | None = None) -> Row:
        """One gateway request as the gateway runs it: reserve (its own transaction), then
        settle with the upstream's usage, or void with an error record."""
        request_id = f"req-{next(self._n):05d}"
        with self.db.write() as conn:
            key = account_store.get_key(conn, self.keys[key_name].id)
            (item,) = current_items(conn, now_ms=self.clock(), item_id=product)
            ratio = resolve_ratio(key_ops.effective_group(key), group_ratios(conn),
                                  item.version.group_ratios)
            route = "/v1/chat/completions" if item.billing_type == "token" else "/apis/v1/x"
            call = Call({REQUEST_ID: request_id, "method": "POST"}, key, item, ratio, route)
            price = item.version.price
            usage = (CallUsage(1) if isinstance(price, CallPrice)
                     else TokenUsage(prompt, completion, cached, cache_write))
            charge = metering.rate(usage, price, ratio)
            cost = charge.cost_nano_usd
            hold = hold_nano if hold_nano is not None else max(cost, 1) + (
                0 if isinstance(price, CallPrice) else 50_000)
            reserved = metering.reserve(conn, request_id=request_id, account_id=key.account_id,
                                        key_id=key.id, amount_nano=hold, ttl_ms=HOUR,
                                        at_ms=tollway.clock.now_ms())
        assert isinstance(reserved, Reservation)
        call.hold = reserved.hold
        with self.db.write() as conn:
            if fail:
                record = call.record(type_="error", status=502,
                                     error=UpstreamError("the upstream answered 500"))
                metering.void(conn, hold_id=reserved.hold.id, record=record,
                              at_ms=tollway.clock.now_ms())
                cost = 0
            else:
                per_call = isinstance(price, CallPrice)
                record = call.record(type_="consume", status=200, usage_source="upstream",
                                     input_tokens=prompt, cached=cached,
                                     cache_write=cache_write, output=completion,
                                     reasoning=reasoning, calls=1 if per_call else 0)
                metering.settle(conn, hold_id=reserved.hold.id, charge=charge, record=record,
                                at_ms=tollway.clock.now_ms())
        row = self._add(Row(request_id, record["created_at_ms"], key.account_id,
                            record["type"], key.id, product, item.billing_type, call.group,
                            cost))
        if tag:
            self.tags[tag] = row
        return row

    def _add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    # ---------------------------------------------------------------- expectations

    def expect(self, where: LogFilter) -> list[str]:
        """The request ids a filter must return, newest first (time, then id)."""
        def match(row: Row) -> bool:
            return all(want is None or got == want for got, want in (
                (row.account_id, where.account_id), (row.product, where.product),
                (row.key_id, where.key_id), (row.group, where.group), (row.type, where.type),
                (row.billing_type, where.billing_type))) and (
                where.start_ms is None or row.at >= where.start_ms) and (
                where.end_ms is None or row.at < where.end_ms)

        found = [(row.at, seq, row.request_id) for seq, row in enumerate(self.rows)
                 if match(row)]
        return [request_id for _, _, request_id in sorted(found, reverse=True)]


T0 = "2025-10-31T02:00:00Z"
KEY_CYCLE = ("a-main", "a-ci", "b-main", "a-main", "c-main", "c-half")


def standard_books(db: Database) -> Books:
    """Three accounts in three groups, five keys (one pinned to vip, one to half), top-ups,
    adjustments both ways, a revocation, and 49 requests of both billing types (errors
    included) from 2025-10-31 02:00 to 2025-11-01 06:00 UTC: records share milliseconds, sit
    on hour boundaries and cross days and months."""
    clock = Clock(ms(T0))
    books = Books(db, clock)
    with frozen(clock):
        books.catalog()
        books.account("alice")
        books.account("bob", "vip")
        books.account("carol", "odd")
        books.topup("alice", "20")
        books.topup("bob", "5")
        books.topup("carol", "3")
        books.key("alice", "a-main")
        books.key("alice", "a-ci", group="vip")
        books.key("bob", "b-main")
        books.key("carol", "c-main")
        books.key("carol", "c-half", group="half")
        clock.advance(7 * MINUTE)
        # the hand-checked ones (test_pricing_explains_every_cost)
        books.request("a-ci", "chat-a", prompt=1234, cached=567, completion=89, tag="h1")
        books.request("c-main", "reasoner-b", prompt=5003,
                      cached=1200, cache_write=800, completion=2001, reasoning=700, tag="h2")
        books.request("c-main", "quote-d", tag="h3")
        books.request("b-main", "search-c", tag="h4")
        books.request("b-main", "quote-d", tag="h5")
        books.request("a-main", "chat-a", prompt=10, cached=3, completion=1, tag="h6")
        books.request("c-half", "quote-d", tag="h7")
        for i in range(40):
            clock.advance(0 if i % 6 == 5 else 47 * MINUTE + 11)
            if i == 10:
                books.adjust("alice", "-0.5")
            if i == 17:
                books.topup("bob", "1.25")
            if i == 24:
                books.revoke("a-ci")
            if i == 30:
                books.adjust("carol", "0.1")
            key = KEY_CYCLE[i % len(KEY_CYCLE)]
            if key == "a-ci" and i >= 24:
                key = "a-main"
            kind = i % 5
            if kind in (1, 3):
                books.request(key, "search-c" if kind == 1 else "quote-d", fail=i % 9 == 7)
            else:
                books.request(key, "reasoner-b" if kind == 2 else "chat-a",
                              prompt=200 + 37 * i, cached=(13 * i) % 150,
                              cache_write=(7 * i) % 50 if kind == 2 else 0,
                              completion=20 + 11 * i,
                              reasoning=(20 + 11 * i) // 3 if kind == 2 else 0,
                              fail=kind == 4)
        clock.set("2025-11-01T06:00:00Z")  # exactly on an hour: start includes, end excludes
        books.request("a-main", "chat-a", prompt=100, completion=10, tag="edge1")
        books.request("a-main", "search-c", tag="edge2")  # the same millisecond
    return books


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def books(request: pytest.FixtureRequest) -> Iterator[Books]:
    """The standard books, written once per backend and only read by the tests using them."""
    with fresh_database(request) as db:
        yield standard_books(db)


def page_through(db: Database, where: LogFilter, limit: int) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        with db.read() as conn:
            rows, cursor = store.usage_page(conn, where, limit=limit, cursor=cursor)
        assert len(rows) <= limit
        assert rows or cursor is None
        ids += [r.request_id for r in rows]
        if cursor is None:
            return ids


# --------------------------------------------------------------------------- the log


def test_the_books_are_what_the_test_wrote(books: Books) -> None:
    with books.db.read() as conn:
        rows = conn.execute(sa.select(usage_records).order_by(usage_records.c.id)).all()
        assert verify(conn) == []
    assert [r.request_id for r in rows] == [r.request_id for r in books.rows]
    for got, want in zip(rows, books.rows, strict=True):
        assert (got.created_at_ms, got.account_id, got.type, got.key_id, got.product,
                got.billing_type, got.group_name, got.cost_nano, got.credit_nano) == (
            want.at, want.account_id, want.type, want.key_id, want.product, want.billing_type,
            want.group, want.cost_nano, want.credit_nano)
    kinds = Counter(r.type for r in books.rows)
    assert kinds == {"consume": 40, "error": 9, "topup": 4, "adjustment": 2, "system": 6}
    assert len({r.at for r in books.rows}) < len(books.rows)  # some share a millisecond


def filters(books: Books) -> list[LogFilter]:
    alice, bob = books.accounts["alice"], books.accounts["bob"]
    return [
        LogFilter(account_id=alice),
        LogFilter(account_id=bob),
        LogFilter(account_id=books.accounts["carol"]),
        LogFilter(),  # every account (operators)
        LogFilter(account_id=alice, start_ms=ms("2025-10-31T05:00:00Z"),
                  end_ms=ms("2025-10-31T17:00:00Z")),
        LogFilter(account_id=alice, start_ms=ms("2025-11-01T06:00:00Z")),
        LogFilter(account_id=alice, end_ms=ms("2025-11-01T06:00:00Z")),
        LogFilter(account_id=alice, product="chat-a"),
        LogFilter(account_id=alice, product="search-c"),
        LogFilter(product="quote-d"),
        LogFilter(account_id=alice, key_id=books.keys["a-ci"].id),
        LogFilter(account_id=alice, group="vip"),
        LogFilter(group="half"),
        LogFilter(account_id=alice, type="consume"),
        LogFilter(account_id=alice, type="error"),
        LogFilter(type="topup"),
        LogFilter(type="adjustment"),
        LogFilter(type="system"),
        LogFilter(type="refund"),
        LogFilter(account_id=alice, billing_type="token"),
        LogFilter(billing_type="per_call"),
        LogFilter(account_id=alice, product="chat-a", type="consume",
                  start_ms=ms("2025-10-31T12:00:00Z")),
        LogFilter(account_id=bob, key_id=books.keys["a-main"].id),  # another account's key
        LogFilter(account_id=alice, start_ms=ms("2025-11-02T00:00:00Z")),
    ]


def test_filters_and_pages_return_exactly_the_expected_records(books: Books) -> None:
    seen_nonempty = 0
    for where in filters(books):
        expected = books.expect(where)
        seen_nonempty += bool(expected)
        with books.db.read() as conn:
            assert [r.request_id for r in store.iter_usage(conn, where, chunk=3)] == expected
        for limit in (1, 4, 50):
            assert page_through(books.db, where, limit) == expected, (where, limit)
    assert seen_nonempty == len(filters(books)) - 3  # refund, bob × alice's key, the future


def test_hour_boundaries_and_shared_milliseconds(books: Books) -> None:
    alice = books.accounts["alice"]
    edge = [books.tags["edge2"].request_id, books.tags["edge1"].request_id]  # newer id first
    on_the_hour = LogFilter(account_id=alice, start_ms=ms("2025-11-01T06:00:00Z"))
    assert page_through(books.db, on_the_hour, 1) == edge
    before = LogFilter(account_id=alice, end_ms=ms("2025-11-01T06:00:00Z"))
    assert not set(edge) & set(page_through(books.db, before, 7))


def test_a_cursor_from_one_filter_never_widens_another(books: Books) -> None:
    """Cursors only say where a page ended; the filter (and the account) always apply."""
    bob = LogFilter(account_id=books.accounts["bob"])
    with books.db.read() as conn:
        _, cursor = store.usage_page(conn, bob, limit=2)
        assert cursor is not None
        alice = LogFilter(account_id=books.accounts["alice"])
        rows, _ = store.usage_page(conn, alice, limit=1000, cursor=cursor)
    assert rows and {r.account_id for r in rows} == {books.accounts["alice"]}


@pytest.mark.parametrize("cursor", ["", "%%%", "bm90LWEtY3Vyc29y", "MTIz", "YS5i",
                                    "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OS4x"])
def test_a_bad_cursor_is_an_invalid_request(books: Books, cursor: str) -> None:
    """Garbage, a cursor without an id, non-numbers, a number no column can hold."""
    where = LogFilter(account_id=books.accounts["alice"])
    with books.db.read() as conn, pytest.raises(InvalidRequest, match="cursor"):
        store.usage_page(conn, where, limit=5, cursor=cursor or "=")


def test_get_record_by_request_id_only_in_its_account(books: Books) -> None:
    row = books.tags["h4"]  # bob's
    with books.db.read() as conn:
        assert store.get_record(conn, row.request_id, account_id=row.account_id).cost_nano \
            == row.cost_nano
        assert store.get_record(conn, row.request_id, account_id=None) is not None
        assert store.get_record(conn, row.request_id,
                                account_id=books.accounts["alice"]) is None
        assert store.get_record(conn, "req-nope", account_id=None) is None


# --------------------------------------------------------------------------- pricing


def recompute(pricing: dict[str, Any]) -> Decimal:
    """The cost from the explanation's own numbers, as a customer would redo it."""
    with localcontext() as ctx:
        ctx.prec = 60
        subtotal = Decimal(0)
        for c in pricing["components"]:
            amount = Decimal(c["quantity"]) * Decimal(c["unit_price_usd"])
            if pricing["billing_type"] == "token":
                amount /= 1_000_000
            assert Decimal(c["amount_usd"]) == amount, c
            subtotal += amount
        exact = subtotal * Decimal(pricing["ratio"])
        assert Decimal(pricing["exact_usd"]) == exact
        return exact.quantize(Decimal("0.000000001"), rounding=ROUND_HALF_UP)


def evaluate_formula(formula: str) -> tuple[Decimal, Decimal, Decimal]:
    """(left-hand side evaluated, the exact value it states, the rounded cost it states)."""
    lhs, rest = formula.split(" = ")
    exact, rounded = rest.removesuffix(" USD").split(" → ")
    expression = re.sub(r"[a-z]+", "", lhs).replace("−", "-").replace("×", "*")
    assert re.fullmatch(r"[\d.()+\-*/ ]+", expression), expression
    python = re.sub(r"\d+(?:\.\d+)?", lambda m: f"D('{m.group()}')", expression)
    with localcontext() as ctx:
        ctx.prec = 60
        value = eval(python, {"D": Decimal})  # digits and operators only (checked above)
    return value, Decimal(exact), Decimal(rounded)


#: tag: (cost in nano-USD worked out by hand, ratio, ratio source)
HAND = {
    # (1234-567-0)×0.15 + 567×0.075 + 0×0.15 + 89×0.6 = 195.975 → /1e6 × 0.7 (vip override)
    # = 0.0001371825 → 0.000137183 (half-up)
    "h1": (137_183, "0.7", "model"),
    # (5003-1200-800)×2.5 + 1200×1.25 + 800×3.125 + 2001×10 = 31517.5 → /1e6 × 0.333
    # = 0.0104953275 → 0.010495328
    "h2": (10_495_328, "0.333", "group"),
    "h3": (411, "0.333", "group"),  # 0.000001235 × 0.333 = 0.000000411255
    "h4": (1_000_000, "0.5", "model"),  # 0.002 × 0.5 (search-c's vip override)
    "h5": (988, "0.8", "group"),  # 0.000001235 × 0.8
    "h6": (1_875, "1", "group"),  # (7×0.15 + 3×0.075 + 1×0.6) / 1e6 = 0.000001875
    "h7": (618, "0.5", "group"),  # 0.000001235 × 0.5 = 0.0000006175 → half-up 618
}


def test_pricing_explains_every_cost(books: Books) -> None:
    with books.db.read() as conn:
        rows = conn.execute(sa.select(usage_records).order_by(usage_records.c.id)).all()
    by_id = {r.request_id: r for r in rows}
    for tag, (cost, ratio, source) in HAND.items():
        row = by_id[books.tags[tag].request_id]
        assert (row.cost_nano, row.ratio, row.ratio_source) == (cost, ratio, source), tag
    explained = 0
    for row in rows:
        view = record_view(row)
        charge = recharge(row)
        if row.type not in REQUEST_TYPES:
            assert charge is None and view["pricing"] is None
            continue
        assert charge is not None
        pricing = view["pricing"]
        assert (pricing["ratio"], pricing["ratio_source"]) == (
            format(Decimal(row.ratio).normalize(), "f"), row.ratio_source)
        lhs, exact, rounded = evaluate_formula(pricing["formula"])
        assert lhs == exact == Decimal(pricing["exact_usd"])
        assert rounded == Decimal(pricing["rounded_usd"]) == recompute(pricing)
        if row.type == "consume":
            assert charge.cost_nano_usd == row.cost_nano
            assert recompute(pricing) == Decimal(view["cost_usd"])
            assert pricing["charged"] is True
        else:  # an error: no usage, so nothing to charge, and nothing was
            assert charge.cost_nano_usd == row.cost_nano == 0
            assert view["cost_usd"] == pricing["rounded_usd"] == "0.000000000"
            assert pricing["charged"] is False and pricing["why_not_charged"]
        names = {c["name"]: c["quantity"] for c in pricing["components"]}
        if row.billing_type == "token":
            assert names == {"input": row.input_tokens - row.cached_input_tokens
                             - row.cache_write_tokens - row.cache_write_1h_tokens,
                             "cache_read": row.cached_input_tokens,
                             "cache_write": row.cache_write_tokens,
                             "cache_write_1h": row.cache_write_1h_tokens,
                             "output": row.output_tokens}
            assert pricing["unit"] == "per 1M tokens"
        else:
            assert names == {"calls": row.calls} and pricing["unit"] == "per call"
        explained += 1
    assert explained == 49
    h1 = record_view(by_id[books.tags["h1"].request_id])["pricing"]
    assert h1["formula"] == ("((1234 − 567 − 0 − 0) × 0.15 + 567 × 0.075 + 0 × 0.15 + "
                             "0 × 0.15 + 89 × 0.6) / 1000000 × 0.7 = 0.0001371825 → "
                             "0.000137183 USD")
    h7 = record_view(by_id[books.tags["h7"].request_id])["pricing"]
    assert h7["formula"] == "1 call × 0.000001235 × 0.5 = 0.0000006175 → 0.000000618 USD"


# --------------------------------------------------------------------------- summaries


def raw_summary(rows: Sequence[Any], group_by: list[str], start: int, end: int
                ) -> tuple[dict[tuple[Any, ...], Counter[str]], Counter[str]]:
    """What a summary must say, summed here over the raw request records."""
    labels: dict[str, Any] = {}
    for name in group_by:
        if name in ("model", "endpoint", "product"):
            labels["product"] = lambda r: r.product
        elif name == "key":
            labels["key_id"] = lambda r: r.key_id
        elif name == "day":
            labels["day_ms"] = lambda r: r.created_at_ms - r.created_at_ms % DAY
        elif name == "hour":
            labels["hour_ms"] = lambda r: r.created_at_ms - r.created_at_ms % HOUR
        else:
            labels["billing_type"] = lambda r: r.billing_type
    groups: dict[tuple[Any, ...], Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for r in rows:
        if r.type not in REQUEST_TYPES or not start <= r.created_at_ms < end:
            continue
        counts = Counter({"requests": int(r.type == "consume"), "errors": int(r.type == "error"),
                          **{c: getattr(r, c) for c in COUNTERS[2:]}})
        totals.update(counts)
        # by model: every model (token-priced or per image); by endpoint: the data APIs
        if "model" in group_by and "endpoint" not in group_by and r.product in ENDPOINTS:
            continue
        if "endpoint" in group_by and "model" not in group_by and r.product not in ENDPOINTS:
            continue
        groups[tuple(f(r) for f in labels.values())].update(counts)
    return groups, totals


GROUPINGS = [[], ["model"], ["endpoint"], ["product"], ["key"], ["day"], ["hour"],
             ["billing_type"], ["model", "day"], ["endpoint", "key"],
             ["product", "hour", "billing_type"], ["model", "endpoint"], ["day", "key", "model"]]
PERIODS = [("2025-10-31T00:00:00Z", "2025-11-02T00:00:00Z"),
           ("2025-10-31T05:00:00Z", "2025-10-31T17:00:00Z"),
           ("2025-10-31T20:00:00Z", "2025-11-01T02:00:00Z"),
           ("2025-11-01T06:00:00Z", "2025-11-01T07:00:00Z")]


def test_summaries_equal_sums_over_the_raw_records(books: Books) -> None:
    with books.db.read() as conn:
        raw = conn.execute(sa.select(usage_records)).all()
        checked = 0
        for account in (*books.accounts.values(), None):
            mine = [r for r in raw if account is None or r.account_id == account]
            for start_text, end_text in PERIODS:
                start, end = ms(start_text), ms(end_text)
                for group_by in GROUPINGS:
                    rows, totals = store.summary(conn, account_id=account, start_ms=start,
                                                 end_ms=end, group_by=group_by)
                    want_groups, want_totals = raw_summary(mine, group_by, start, end)
                    assert totals == {c: want_totals[c] for c in COUNTERS}
                    if not group_by:  # one row: the totals (zeros for an empty period)
                        assert [{c: int(row[c]) for c in COUNTERS} for row in rows] == [totals]
                        continue
                    label_names = [k for k in (rows[0] if rows else {})
                                   if k not in COUNTERS and k != "key_name"]
                    got = {tuple(int(row[k]) if k.endswith("_ms") else row[k]
                                 for k in label_names): {c: int(row[c]) for c in COUNTERS}
                           for row in rows}
                    assert len(got) == len(rows)  # one row per group
                    assert got == {k: {c: v[c] for c in COUNTERS}
                                   for k, v in want_groups.items()}, (account, group_by)
                    if "key" in group_by:
                        names = {k.id: k.name for k in books.keys.values()}
                        assert all(row["key_name"] == names[row["key_id"]] for row in rows)
                    checked += bool(rows)
    assert checked > 100


def test_summary_view_totals_and_averages(books: Books) -> None:
    """Alice, 2025-10-31 00:00 to 2025-11-02 00:00, by day: numbers in the API's shape."""
    alice = books.accounts["alice"]
    start, end = ms("2025-10-31T00:00:00Z"), ms("2025-11-02T00:00:00Z")
    mine = [r for r in books.rows if r.account_id == alice and r.type in REQUEST_TYPES]
    with books.db.read() as conn:
        rows, totals = store.summary(conn, account_id=alice, start_ms=start, end_ms=end,
                                     group_by=["day"])
        raw = conn.execute(sa.select(usage_records).where(
            usage_records.c.account_id == alice)).all()
    view = summary_view(rows, totals, start_ms=start, end_ms=end)
    consumed = [r for r in mine if r.type == "consume"]
    cost = sum(r.cost_nano for r in mine)
    tokens = sum(r.input_tokens + r.output_tokens for r in raw if r.type in REQUEST_TYPES)
    assert view["totals"]["requests"] == len(consumed)
    assert view["totals"]["errors"] == len(mine) - len(consumed)
    assert Decimal(view["totals"]["cost_usd"]) == Decimal(cost) / NANO
    minutes = Decimal(2 * 24 * 60)
    assert view["totals"]["average_rpm"] == str(
        (len(consumed) / minutes).quantize(Decimal("0.001")))
    assert view["totals"]["average_tpm"] == str((tokens / minutes).quantize(Decimal("0.001")))
    assert [d["day"] for d in view["data"]] == ["2025-10-31T00:00:00Z", "2025-11-01T00:00:00Z"]
    assert sum(Decimal(d["cost_usd"]) for d in view["data"]) == Decimal(cost) / NANO
    assert all(re.fullmatch(r"\d+\.\d{9}", d["cost_usd"]) for d in view["data"])


def test_unknown_group_by_is_refused(books: Books) -> None:
    with books.db.read() as conn, pytest.raises(InvalidRequest, match="group_by"):
        store.summary(conn, account_id=None, start_ms=0, end_ms=1, group_by=["week"])


# --------------------------------------------------------------------------- statements


def statement_books(db: Database) -> Books:
    """Dora's October and November 2025 (amounts worked out in the test), and an open hold
    in December."""
    clock = Clock(ms("2025-10-01T09:00:00Z"))
    books = Books(db, clock)
    with frozen(clock):
        books.catalog()
        books.account("dora")
        books.key("dora", "d1")
        clock.set("2025-10-05T10:00:00Z")
        books.topup("dora", "10")
        clock.set("2025-10-06T11:00:00Z")
        books.request("d1", "chat-a", prompt=1234, cached=567, completion=89)  # 0.000195975
        clock.set("2025-10-20T12:00:00Z")
        books.request("d1", "search-c")  # 0.002
        clock.set("2025-10-25T13:00:00Z")
        books.adjust("dora", "-1")
        clock.set("2025-10-28T14:00:00Z")
        books.request("d1", "chat-a", prompt=50, completion=5, fail=True)  # nothing
        clock.set("2025-10-31T23:00:00Z")
        books.request("d1", "search-c", fail=True)  # nothing
        clock.set("2025-11-03T08:00:00Z")
        books.topup("dora", "0.5")
        books.adjust("dora", "0.25")
        clock.set("2025-11-10T09:00:00Z")
        # 10.025 USD against a hold of everything available (9.747804025): the rest is
        # written off and the balance stops at zero
        with db.read() as conn:
            available = account_store.get_account(conn, books.accounts["dora"]).available_nano
        assert available == 9_747_804_025
        books.request("d1", "reasoner-b", prompt=10_000, completion=1_000_000,
                      hold_nano=available)
        clock.set("2025-11-15T10:00:00Z")
        books.topup("dora", "2")
        clock.set("2025-12-02T10:00:00Z")
        with db.write() as conn:  # a hold nobody settled yet: the balance total is the same
            ledger.place_hold(conn, books.accounts["dora"], 1_000_000, idempotency_key="open",
                              ttl_ms=HOUR, at_ms=tollway.clock.now_ms())
    return books


def month_statement(db: Database, account_id: int, month: str) -> dict[str, Any]:
    start, end = month_bounds(month)
    with db.read() as conn:
        account = account_store.get_account(conn, account_id)
        return statement_view(account, month, store.statement(conn, account_id,
                                                              start_ms=start, end_ms=end))


def test_statements_reconcile_to_the_nano_dollar(db: Database) -> None:
    books = statement_books(db)
    dora = books.accounts["dora"]
    with db.read() as conn:
        assert verify(conn) == []
        account = account_store.get_account(conn, dora)
    assert (account.available_nano, account.held_nano) == (1_999_000_000, 1_000_000)

    october = month_statement(db, dora, "2025-10")
    assert {k: v for k, v in october.items() if k.endswith("_usd")} == {
        "opening_balance_usd": "0.000000000", "topups_usd": "10.000000000",
        "adjustments_usd": "-1.000000000", "charges_usd": "0.002195975",
        "written_off_usd": "0.000000000", "closing_balance_usd": "8.997804025",
        # no promotional credit here: all of each balance is paid
        "opening_paid_usd": "0.000000000", "opening_promotional_usd": "0.000000000",
        "grants_added_usd": "0.000000000", "grants_spent_usd": "0.000000000",
        "grants_expired_usd": "0.000000000", "closing_paid_usd": "8.997804025",
        "closing_promotional_usd": "0.000000000"}
    assert october["reconciliation"] == "0.000000000 + 10.000000000 − 1.002195975 = 8.997804025"
    assert october["charges_by_product"] == [
        {"product": "chat-a", "billing_type": "token", "requests": 1, "calls": 0,
         "input_tokens": 1234, "output_tokens": 89, "cost_usd": "0.000195975"},
        {"product": "search-c", "billing_type": "per_call", "requests": 1, "calls": 1,
         "input_tokens": 0, "output_tokens": 0, "cost_usd": "0.002000000"}]

    november = month_statement(db, dora, "2025-11")
    assert {k: v for k, v in november.items() if k.endswith("_usd")} == {
        "opening_balance_usd": "8.997804025", "topups_usd": "2.500000000",
        "adjustments_usd": "0.250000000", "charges_usd": "9.747804025",
        "written_off_usd": "0.277195975", "closing_balance_usd": "2.000000000",
        "opening_paid_usd": "8.997804025", "opening_promotional_usd": "0.000000000",
        "grants_added_usd": "0.000000000", "grants_spent_usd": "0.000000000",
        "grants_expired_usd": "0.000000000", "closing_paid_usd": "2.000000000",
        "closing_promotional_usd": "0.000000000"}
    assert november["reconciliation"] == "8.997804025 + 2.750000000 − 9.747804025 = 2.000000000"
    assert november["charges_by_product"] == [
        {"product": "reasoner-b", "billing_type": "token", "requests": 1, "calls": 0,
         "input_tokens": 10_000, "output_tokens": 1_000_000, "cost_usd": "10.025000000"}]
    # what was charged = what was paid + what was written off
    assert Decimal("9.747804025") + Decimal("0.277195975") == Decimal("10.025")

    for month, balance in (("2025-09", "0.000000000"), ("2025-12", "2.000000000"),
                           ("2026-01", "2.000000000")):
        quiet = month_statement(db, dora, month)
        assert (quiet["opening_balance_usd"], quiet["closing_balance_usd"]) == (balance, balance)
        assert quiet["topups_usd"] == quiet["charges_usd"] == "0.000000000"
        assert quiet["charges_by_product"] == []

    # opening + credits − debits = closing, and the CSV says the same
    for view in (october, november):
        lines = list(csv.reader(io.StringIO(statement_csv(view))))
        amounts = {line[0]: Decimal(line[3]) for line in lines[1:] if line[0] != "charge"}
        assert (amounts["opening balance"] + amounts["top-ups"] + amounts["adjustments"]
                - amounts["charges paid"]) == amounts["closing balance"]
        charged = sum(Decimal(line[3]) for line in lines if line[0] == "charge")
        assert charged == amounts["charges paid"] + amounts["written off"]


@pytest.mark.parametrize("month", ["2025-13", "2025", "", "October", "2025-10-01"])
def test_month_must_be_yyyy_mm(month: str) -> None:
    with pytest.raises(InvalidRequest, match="YYYY-MM"):
        month_bounds(month)


def test_month_bounds_are_utc_calendar_months() -> None:
    assert month_bounds("2025-10") == (ms("2025-10-01T00:00:00Z"), ms("2025-11-01T00:00:00Z"))
    assert month_bounds("2025-12") == (ms("2025-12-01T00:00:00Z"), ms("2026-01-01T00:00:00Z"))
    assert month_bounds("2024-02") == (ms("2024-02-01T00:00:00Z"), ms("2024-03-01T00:00:00Z"))


# --------------------------------------------------------------------------- arrivals


def test_pages_have_no_gaps_or_duplicates_while_records_arrive(db: Database) -> None:
    clock = Clock(ms("2025-11-05T00:00:00Z"))
    books = Books(db, clock)
    with frozen(clock):
        books.catalog()
        books.account("alice")
        books.account("bob")
        books.topup("alice", "50")
        books.topup("bob", "50")
        books.key("alice", "a1")
        books.key("alice", "a2", group="vip")
        books.key("bob", "b1")
        for i in range(24):  # runs of three records in the same millisecond
            clock.advance(0 if i % 3 else MINUTE)
            key = ("a1", "a2", "b1")[i % 3]
            if i % 4 == 0:
                books.request(key, "search-c")
            else:
                books.request(key, "chat-a", prompt=100 + i, completion=10 + i)
        alice = LogFilter(account_id=books.accounts["alice"])
        chat = LogFilter(account_id=books.accounts["alice"], product="chat-a")
        snapshots = {alice: books.expect(alice), chat: books.expect(chat)}
        assert len(snapshots[alice]) == 19 and len(snapshots[chat]) == 12
        cursors: dict[LogFilter, str | None] = {}
        pages: dict[LogFilter, list[str]] = {alice: [], chat: []}
        done: set[LogFilter] = set()
        arrivals = 0
        while len(done) < 2:
            for where in (alice, chat):
                if where in done:
                    continue
                with db.read() as conn:
                    rows, cursor = store.usage_page(conn, where, limit=4,
                                                    cursor=cursors.get(where))
                pages[where] += [r.request_id for r in rows]
                cursors[where] = cursor
                if cursor is None:
                    done.add(where)
            # new activity between page fetches: the same millisecond as the newest record,
            # then later ones, of every kind, for both accounts
            books.request("a1", "chat-a", prompt=7, completion=7)
            clock.advance(1)
            books.request("a2", "chat-a", prompt=8, completion=8)
            books.request("b1", "search-c")
            books.topup("alice", "1")
            arrivals += 4
        assert arrivals >= 20
    for where, snapshot in snapshots.items():
        assert pages[where] == snapshot  # in order, each once, none that arrived later
    # and the newest page now starts with what arrived last
    with db.read() as conn:
        rows, _ = store.usage_page(conn, alice, limit=1)
    assert rows[0].request_id == books.rows[-1].request_id


# --------------------------------------------------------------------------- exports


def test_exports_stream_every_record_exactly_once(db: Database) -> None:
    """1,200 bulk records plus real ones: more than one export chunk (500 rows) and more than
    one keyset chunk."""
    clock = Clock(ms("2025-11-20T00:00:00Z"))
    books = Books(db, clock)
    with frozen(clock):
        books.catalog()
        books.account("erin")
        books.account("frank")
        books.topup("erin", "5")
        books.topup("frank", "5")
        books.key("erin", "e1")
        books.key("frank", "f1")
        template = books.request("e1", "chat-a", prompt=30, completion=3)
        books.request("f1", "search-c")
    with db.read() as conn:
        record = dict(usage_store.get_usage(conn, template.request_id)._mapping)
    record.pop("id")
    record.pop("credit_nano")
    erin = books.accounts["erin"]
    with db.write() as conn:  # the hold is the template's: the records are not requests'
        for i in range(1200):
            usage_store.insert_usage(conn, {**record, "request_id": f"bulk-{i:05d}",
                                            "created_at_ms": record["created_at_ms"] + i // 7,
                                            "note": f'line "{i}", with a comma\nand a newline'})
    where = LogFilter(account_id=erin)
    # newest first: the bulk records are at or after the real ones' millisecond, with
    # higher ids, so all of them come first
    expected = [f"bulk-{i:05d}" for i in reversed(range(1200))] + books.expect(where)
    with db.read() as conn:
        chunks = list(export_csv(store.iter_usage(conn, where, chunk=100)))
    assert len(chunks) >= 3
    table = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert [r["request_id"] for r in table] == expected
    assert len(set(r["request_id"] for r in table)) == len(table) == 1200 + 3
    assert table[0]["note"] == 'line "1199", with a comma\nand a newline'
    assert table[0]["cost_usd"] == "0.000006300"  # (30×0.15 + 3×0.6) / 1e6

    with db.read() as conn:
        lines = b"".join(export_jsonl(store.iter_usage(conn, where, chunk=100))).splitlines()
    items = [json.loads(line) for line in lines]
    assert [i["request_id"] for i in items] == expected
    assert {i["account_id"] for i in items} == {erin}
    assert all(i["pricing"]["rounded_usd"] == i["cost_usd"] for i in items
               if i["type"] == "consume")

    # an empty range is a header and nothing else
    with db.read() as conn:
        nothing = LogFilter(account_id=erin, start_ms=ms("2030-01-01T00:00:00Z"))
        assert b"".join(export_csv(store.iter_usage(conn, nothing))).decode().count("\n") == 1
        assert b"".join(export_jsonl(store.iter_usage(conn, nothing))) == b""
