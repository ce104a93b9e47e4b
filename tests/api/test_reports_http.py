"""The usage log, summaries, statements and exports over HTTP, on SQLite and PostgreSQL.

A customer's key sees its own account and nothing else, however it asks: another account's
request ids, key ids, cursors and account ids in the query all find nothing, and a record of
another account reads exactly like a missing one. The operator's routes see any account and
refuse anything but the admin token. The books are :func:`test_reports.standard_books`.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from test_reports import (
    COUNTERS,
    NANO,
    REQUEST_TYPES,
    Books,
    ms,
    raw_summary,
    standard_books,
)

from fakes import fresh_database
from tollway.app import create_app
from tollway.money import format_usd
from tollway.store.reports import LogFilter
from tollway.store.tables import usage_records

with warnings.catch_warnings():
    # starlette 1.x prefers httpx2 for its test client; httpx works the same
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

ADMIN_TOKEN = "adm-reports"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def app_client(request: pytest.FixtureRequest) -> Iterator[tuple[Books, TestClient]]:
    with fresh_database(request) as db:
        books = standard_books(db)
        with TestClient(create_app(database_url=db.url, admin_token=ADMIN_TOKEN)) as client:
            yield books, client


def auth(books: Books, key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {books.secrets[key]}"}


def pages(client: TestClient, path: str, headers: dict[str, str], **params: Any) -> list[Any]:
    """Every item of a paged list, following ``next_cursor``."""
    items: list[Any] = []
    cursor = None
    while True:
        response = client.get(path, headers=headers,
                              params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        items += body["data"]
        cursor = body["next_cursor"]
        assert body["has_more"] is (cursor is not None)
        if cursor is None:
            return items


def error(response: Any, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert body["code"] == code, body
    assert body["request_id"] == response.headers["x-request-id"]
    return str(body["message"])


# --------------------------------------------------------------------------- customers


def test_a_key_pages_through_its_own_log_with_every_filter(
        app_client: tuple[Books, TestClient]) -> None:
    books, client = app_client
    alice = books.accounts["alice"]
    headers = auth(books, "a-main")
    cases: list[tuple[dict[str, Any], LogFilter]] = [
        ({}, LogFilter(account_id=alice)),
        ({"start": "2025-10-31T05:00:00Z", "end": "2025-10-31T17:00:00+00:00"},
         LogFilter(account_id=alice, start_ms=ms("2025-10-31T05:00:00Z"),
                   end_ms=ms("2025-10-31T17:00:00Z"))),
        ({"model": "chat-a"}, LogFilter(account_id=alice, product="chat-a")),
        ({"endpoint": "search-c"}, LogFilter(account_id=alice, product="search-c")),
        ({"key": books.keys["a-ci"].id}, LogFilter(account_id=alice,
                                                   key_id=books.keys["a-ci"].id)),
        ({"group": "vip"}, LogFilter(account_id=alice, group="vip")),
        ({"type": "error"}, LogFilter(account_id=alice, type="error")),
        ({"type": "system"}, LogFilter(account_id=alice, type="system")),
        ({"billing_type": "per_call", "type": "consume"},
         LogFilter(account_id=alice, billing_type="per_call", type="consume")),
        # another account's id in the query changes nothing
        ({"account": books.accounts["bob"]}, LogFilter(account_id=alice)),
    ]
    for params, where in cases:
        items = pages(client, "/v1/billing/usage", headers, limit=7, **params)
        assert [i["request_id"] for i in items] == books.expect(where), params
        assert {i["account_id"] for i in items} <= {alice}
    # the other key of the same account sees the same account
    first = client.get("/v1/billing/usage", headers=auth(books, "a-main"), params={"limit": 3})
    assert first.json()["data"][0]["request_id"] == books.expect(LogFilter(account_id=alice))[0]


def test_another_accounts_records_keys_and_cursors_find_nothing(
        app_client: tuple[Books, TestClient]) -> None:
    books, client = app_client
    alice, bob = books.accounts["alice"], books.accounts["bob"]
    headers = auth(books, "a-main")
    bobs = books.expect(LogFilter(account_id=bob))
    assert len(bobs) > 10

    # a request id of bob's reads exactly like one that does not exist
    for request_id in bobs:
        message = error(client.get(f"/v1/billing/usage/{request_id}", headers=headers),
                        404, "not_found")
        assert message == f"no usage record {request_id!r}"
    missing = error(client.get("/v1/billing/usage/req-99999", headers=headers), 404,
                    "not_found")
    assert missing == "no usage record 'req-99999'"
    own = books.tags["h6"].request_id
    one = client.get(f"/v1/billing/usage/{own}", headers=headers)
    assert one.status_code == 200 and one.json()["account_id"] == alice
    assert one.json()["pricing"]["rounded_usd"] == one.json()["cost_usd"] == "0.000001875"

    # bob's key ids as a filter: nothing, on the log and the export
    bob_key = books.keys["b-main"].id
    listed = client.get("/v1/billing/usage", headers=headers, params={"key": bob_key})
    assert listed.json() == {"object": "list", "data": [], "next_cursor": None,
                             "has_more": False}
    exported = client.get("/v1/billing/usage/export", headers=headers,
                          params={"key": bob_key, "format": "jsonl"})
    assert exported.status_code == 200 and exported.content == b""

    # bob's cursors only say where a page ends: alice still sees alice's records
    cursors = []
    cursor = None
    while True:
        body = client.get("/v1/billing/usage", headers=auth(books, "b-main"),
                          params={"limit": 4, **({"cursor": cursor} if cursor else {})}).json()
        assert {i["account_id"] for i in body["data"]} == {bob}
        if (cursor := body["next_cursor"]) is None:
            break
        cursors.append(cursor)
    alices = books.expect(LogFilter(account_id=alice))
    for cursor in cursors:
        items = pages(client, "/v1/billing/usage", headers, cursor=cursor, limit=50)
        assert items and {i["account_id"] for i in items} == {alice}
        ids = [i["request_id"] for i in items]
        assert ids == alices[len(alices) - len(ids):]  # a tail of alice's own log

    # summary and statement: alice's numbers only, whatever the query says
    summary = client.get("/v1/billing/summary", headers=headers, params={
        "start": "2025-10-31T00:00:00Z", "end": "2025-11-02T00:00:00Z", "group_by": "key",
        "account": bob}).json()
    assert summary["account"]["id"] == alice
    alice_keys = {books.keys[k].id for k in ("a-main", "a-ci")}
    assert {row["key_id"] for row in summary["data"]} == alice_keys
    alice_cost = sum(r.cost_nano for r in books.rows if r.account_id == alice)
    assert summary["totals"]["cost_usd"] == format_usd(alice_cost)
    statement = client.get("/v1/billing/statement", headers=headers,
                           params={"month": "2025-10", "account": bob}).json()
    assert statement["account"]["name"] == "alice"


def test_exports_stream_the_whole_range_once(app_client: tuple[Books, TestClient]) -> None:
    books, client = app_client
    alice = books.accounts["alice"]
    expected = books.expect(LogFilter(account_id=alice))
    response = client.get("/v1/billing/usage/export", headers=auth(books, "a-main"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert 'filename="usage.csv"' in response.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["request_id"] for r in table] == expected
    costs = {r.request_id: r.cost_nano for r in books.rows}
    assert all(row["cost_usd"] == format_usd(costs[row["request_id"]]) for row in table)

    response = client.get("/v1/billing/usage/export", headers=auth(books, "a-main"),
                          params={"format": "jsonl", "model": "chat-a"})
    assert response.headers["content-type"].startswith("application/x-ndjson")
    items = [json.loads(line) for line in response.text.splitlines()]
    assert [i["request_id"] for i in items] == books.expect(
        LogFilter(account_id=alice, product="chat-a"))


def test_summary_over_http_equals_the_raw_records(app_client: tuple[Books, TestClient]) -> None:
    books, client = app_client
    bob = books.accounts["bob"]
    with books.db.read() as conn:
        raw = conn.execute(sa.select(usage_records)
                           .where(usage_records.c.account_id == bob)).all()
    # a start inside an hour rounds down, an end inside one rounds up
    body = client.get("/v1/billing/summary", headers=auth(books, "b-main"), params={
        "start": "2025-10-31T00:30:00Z", "end": "2025-11-01T05:10:00Z",
        "group_by": "endpoint,day"}).json()
    assert (body["start"], body["end"]) == ("2025-10-31T00:00:00Z", "2025-11-01T06:00:00Z")
    groups, totals = raw_summary(raw, ["endpoint", "day"], ms("2025-10-31T00:00:00Z"),
                                 ms("2025-11-01T06:00:00Z"))
    assert {k: v for k, v in body["totals"].items() if k in COUNTERS} == {
        c: totals[c] for c in COUNTERS if c != "cost_nano"}
    assert body["totals"]["cost_usd"] == format_usd(totals["cost_nano"])
    got = {(row["product"], ms(row["day"])): {**{c: row[c] for c in COUNTERS[:-1]},
                                               "cost_usd": row["cost_usd"]}
           for row in body["data"]}
    assert got == {key: {**{c: v[c] for c in COUNTERS[:-1]},
                         "cost_usd": format_usd(v["cost_nano"])} for key, v in groups.items()}
    assert {product for product, _ in got} == {"search-c", "quote-d"}


def test_statements_over_http_reconcile(app_client: tuple[Books, TestClient]) -> None:
    """Alice's October and November from the books: top-ups, adjustments and charges by
    month, added up here."""
    books, client = app_client
    alice = books.accounts["alice"]
    headers = auth(books, "a-main")
    november_start = ms("2025-11-01T00:00:00Z")
    mine = [r for r in books.rows if r.account_id == alice]

    def total(kind: str, november: bool) -> int:
        return sum(r.cost_nano if kind in REQUEST_TYPES else r.credit_nano for r in mine
                   if r.type == kind and (r.at >= november_start) == november)

    opening = 0
    for month, november in (("2025-10", False), ("2025-11", True)):
        view = client.get("/v1/billing/statement", headers=headers,
                          params={"month": month}).json()
        topups, adjustments = total("topup", november), total("adjustment", november)
        charges = total("consume", november)
        closing = opening + topups + adjustments - charges
        assert (view["opening_balance_usd"], view["topups_usd"], view["adjustments_usd"],
                view["charges_usd"], view["written_off_usd"], view["closing_balance_usd"]) == (
            format_usd(opening), format_usd(topups), format_usd(adjustments),
            format_usd(charges), "0.000000000", format_usd(closing))
        assert sum(Decimal(p["cost_usd"]) for p in view["charges_by_product"]) == \
            Decimal(charges) / NANO
        opening = closing
    balance = client.get("/v1/billing/balance", headers=headers).json()
    assert balance["balance_usd"] == format_usd(opening)

    as_csv = client.get("/v1/billing/statement", headers=headers,
                        params={"month": "2025-11", "format": "csv"})
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert ["closing balance", "", "", format_usd(opening)] in list(
        csv.reader(io.StringIO(as_csv.text)))
    as_html = client.get("/v1/billing/statement", headers=headers,
                         params={"month": "2025-11", "format": "html"})
    assert as_html.headers["content-type"].startswith("text/html")
    assert "<h1>Statement for 2025-11</h1>" in as_html.text
    assert format_usd(opening) in as_html.text


def test_bad_requests_are_400_and_bad_keys_401(app_client: tuple[Books, TestClient]) -> None:
    books, client = app_client
    headers = auth(books, "a-main")
    for path, params in (
            ("/v1/billing/usage", {"cursor": "not-a-cursor"}),
            ("/v1/billing/usage", {"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OTk5OS4x"}),
            ("/v1/billing/usage", {"cursor": "LTEuLTE"}),  # "-1.-1"
            ("/v1/billing/usage", {"type": "bogus"}),
            ("/v1/billing/usage", {"billing_type": "monthly"}),
            ("/v1/billing/usage", {"key": "abc"}),
            ("/v1/billing/usage", {"limit": "0"}),
            ("/v1/billing/usage", {"limit": "1001"}),
            ("/v1/billing/usage", {"start": "yesterday"}),
            ("/v1/billing/usage", {"model": "chat-a", "endpoint": "search-c"}),
            ("/v1/billing/usage", {"model": "chat-a\x00"}),  # PostgreSQL refuses NUL
            ("/v1/billing/usage", {"group": "\x00"}),
            ("/v1/billing/usage/export", {"endpoint": "\x00"}),
            ("/v1/billing/usage/export", {"format": "xml"}),
            ("/v1/billing/summary", {"group_by": "week"}),
            ("/v1/billing/summary", {"start": "2025-11-02T00:00:00Z",
                                     "end": "2025-11-01T00:00:00Z"}),
            ("/v1/billing/statement", {"month": "2025-13"}),
            ("/v1/billing/statement", {}),
            ("/v1/billing/statement", {"month": "2025-10", "format": "pdf"})):
        error(client.get(path, headers=headers, params=params), 400, "invalid_request")
    for odd in ("%00", "x" * 300, "req-00001%00"):  # not ids: no record, not a crash
        error(client.get(f"/v1/billing/usage/{odd}", headers=headers), 404, "not_found")
    for path in ("/v1/billing/usage", "/v1/billing/usage/export", "/v1/billing/summary",
                 "/v1/billing/statement?month=2025-10", "/v1/billing/usage/req-00001"):
        error(client.get(path), 401, "invalid_api_key")
        error(client.get(path, headers={"Authorization": "Bearer tw-nope"}), 401,
              "invalid_api_key")
        error(client.get(path, headers=auth(books, "a-ci")), 401, "revoked_api_key")
        error(client.get(path, headers=ADMIN), 401, "invalid_api_key")


# --------------------------------------------------------------------------- operators


def test_admin_routes_see_any_account_and_need_the_token(
        app_client: tuple[Books, TestClient]) -> None:
    books, client = app_client
    bob = books.accounts["bob"]
    for path in ("/admin/v1/usage", "/admin/v1/usage/export", "/admin/v1/summary",
                 f"/admin/v1/usage/{books.tags['h4'].request_id}",
                 "/admin/v1/accounts/bob/summary",
                 "/admin/v1/accounts/bob/statement?month=2025-10"):
        error(client.get(path), 401, "invalid_admin_token")
        error(client.get(path, headers=auth(books, "b-main")), 401, "invalid_admin_token")
        error(client.get(path, headers={"Authorization": "Bearer adm-wrong"}), 401,
              "invalid_admin_token")

    everything = pages(client, "/admin/v1/usage", ADMIN, limit=13)
    assert [i["request_id"] for i in everything] == books.expect(LogFilter())
    for ref in (bob, "bob"):
        items = pages(client, "/admin/v1/usage", ADMIN, account=ref, limit=5)
        assert [i["request_id"] for i in items] == books.expect(LogFilter(account_id=bob))
    vip = pages(client, "/admin/v1/usage", ADMIN, group="vip")
    assert [i["request_id"] for i in vip] == books.expect(LogFilter(group="vip"))
    error(client.get("/admin/v1/usage", headers=ADMIN, params={"account": "nobody"}), 404,
          "unknown_account")

    record = client.get(f"/admin/v1/usage/{books.tags['h4'].request_id}", headers=ADMIN)
    assert record.status_code == 200 and record.json()["account_id"] == bob
    assert record.json()["pricing"]["formula"] == \
        "1 call × 0.002 × 0.5 = 0.001 → 0.001000000 USD"

    period = {"start": "2025-10-31T00:00:00Z", "end": "2025-11-02T00:00:00Z"}
    everyone = client.get("/admin/v1/summary", headers=ADMIN, params=period).json()
    assert everyone["totals"]["cost_usd"] == format_usd(sum(r.cost_nano for r in books.rows))
    assert "account" not in everyone
    bobs = client.get("/admin/v1/accounts/bob/summary", headers=ADMIN, params=period).json()
    assert bobs["account"]["id"] == bob
    assert bobs["totals"]["cost_usd"] == format_usd(
        sum(r.cost_nano for r in books.rows if r.account_id == bob))
    by_query = client.get("/admin/v1/summary", headers=ADMIN,
                          params={**period, "account": "bob"}).json()
    assert by_query["totals"] == bobs["totals"]

    statement = client.get("/admin/v1/accounts/carol/statement", headers=ADMIN,
                           params={"month": "2025-10"}).json()
    assert statement["account"]["name"] == "carol"
    assert statement["topups_usd"] == "3.000000000"
    export = client.get("/admin/v1/usage/export", headers=ADMIN,
                        params={"account": "bob", "format": "jsonl"})
    assert [json.loads(line)["request_id"] for line in export.text.splitlines()] == \
        books.expect(LogFilter(account_id=bob))
    error(client.get("/admin/v1/summary", headers=ADMIN, params={"group_by": "week"}), 400,
          "invalid_request")
