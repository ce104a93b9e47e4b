"""The customer console over HTTP, on SQLite and PostgreSQL, against the books of
:func:`test_reports.standard_books` (three accounts, five keys, 49 requests, top-ups).

The console reads through the same functions as the JSON API, so each page is checked
against the API's answer for the same account: the same records in the same order, the same
pricing explanations (character for character), the same export, the same statement. The
isolation matrix signs in as one customer and tries every place an id could go: query
strings, forms, paths, cursors; and every operator page and /admin/v1 route.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.routing import Mount, Route
from test_reports import Books, standard_books

from fakes import fresh_database
from tollway.app import create_app
from tollway.billing import logins
from tollway.store import accounts as account_store
from webclient import TestClient, csrf, login, operator_login, post_form

ADMIN_TOKEN = "adm-console"
PASSWORD = "console pass 1"
_IDS = re.compile(r'data-request-id="([^"]+)"')


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def console(request: pytest.FixtureRequest) -> Iterator[tuple[Books, TestClient]]:
    with fresh_database(request) as db:
        books = standard_books(db)
        password_hash = logins.hash_password(PASSWORD)
        with db.write() as conn:
            for name, account_id in books.accounts.items():
                logins.set_password_hash(conn, account_id, password_hash)
                account_store.set_email(conn, account_id, f"{name}@example.com")
        with TestClient(create_app(database_url=db.url, admin_token=ADMIN_TOKEN)) as client:
            yield books, client


@pytest.fixture
def as_alice(console: tuple[Books, TestClient]) -> Iterator[tuple[Books, TestClient]]:
    books, client = console
    assert login(client, "alice", PASSWORD).status_code == 303
    yield books, client
    client.cookies.clear()


def api(client: TestClient, books: Books, as_key: str, path: str, **params: Any) -> Any:
    response = client.get(path, params=params,
                          headers={"Authorization": f"Bearer {books.secrets[as_key]}"})
    assert response.status_code == 200, response.text
    return response


def api_log(client: TestClient, books: Books, as_key: str,
            **params: Any) -> list[dict[str, Any]]:
    saved = dict(client.cookies)
    client.cookies.clear()  # the API takes keys, not sessions
    try:
        return api(client, books, as_key, "/v1/billing/usage", limit=1000,
                   **params).json()["data"]
    finally:
        for name, value in saved.items():
            client.cookies.set(name, value)


def page_ids(text: str) -> list[str]:
    return _IDS.findall(text)


# ----------------------------------------------------------------------------- pages


def test_the_usage_log_shows_the_apis_records_and_pricing(
        as_alice: tuple[Books, TestClient]) -> None:
    books, client = as_alice
    expected = api_log(client, books, "a-main")
    page = client.get("/console/usage", params={"limit": 500})
    assert page.status_code == 200
    assert page_ids(page.text) == [r["request_id"] for r in expected]
    explained = [r for r in expected if r["pricing"] is not None]
    assert len(explained) > 10
    shown = {}
    for row in page.text.split('<tr data-request-id="')[1:]:
        request_id, _, rest = row.partition('"')
        if found := re.search(r'<pre data-testid="pricing">(.*?)</pre>', rest, flags=re.S):
            shown[request_id] = found.group(1)
    assert set(shown) == {r["request_id"] for r in explained}
    for record in explained:
        text = html.unescape(shown[record["request_id"]])
        assert json.loads(text) == record["pricing"]  # exactly as the API returns it
        assert text == json.dumps(record["pricing"], indent=2, ensure_ascii=False)


def test_the_usage_log_pages_with_the_apis_cursor_and_filters(
        as_alice: tuple[Books, TestClient]) -> None:
    books, client = as_alice
    expected = [r["request_id"] for r in api_log(client, books, "a-main")]
    seen: list[str] = []
    url = "/console/usage?limit=7"
    while url:
        page = client.get(url)
        assert page.status_code == 200
        seen += page_ids(page.text)
        older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', page.text)
        url = "/console/usage" + html.unescape(older.group(1)) if older else ""
    assert seen == expected
    ci = books.keys["a-ci"].id
    for params in ({"key": ci}, {"type": "consume"}, {"product": "chat-a"},
                   {"group": "vip", "type": "consume"},
                   {"start": "2025-10-31T12:00:00Z", "end": "2025-11-01"}):
        wanted = [r["request_id"] for r in api_log(client, books, "a-main", **params)]
        page = client.get("/console/usage", params={**params, "limit": 500})
        assert page_ids(page.text) == wanted, params
    bad = client.get("/console/usage", params={"type": "nonsense"})
    assert bad.status_code == 400 and "text/html" in bad.headers["content-type"]


def test_the_export_is_the_apis_export(as_alice: tuple[Books, TestClient]) -> None:
    books, client = as_alice
    page = client.get("/console/usage/export", params={"type": "consume"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/csv")
    saved = client.cookies.get("tollway_session")
    client.cookies.clear()
    from_api = api(client, books, "a-main", "/v1/billing/usage/export", type="consume")
    client.cookies.set("tollway_session", saved or "")
    assert page.content == from_api.content and page.content.count(b"\n") > 10


def test_overview_and_statement_show_the_apis_figures(
        as_alice: tuple[Books, TestClient]) -> None:
    books, client = as_alice
    saved = client.cookies.get("tollway_session")
    client.cookies.clear()
    balance = api(client, books, "a-main", "/v1/billing/balance").json()
    statement = api(client, books, "a-main", "/v1/billing/statement", month="2025-11").json()
    client.cookies.set("tollway_session", saved or "")
    overview = client.get("/console")
    assert overview.status_code == 200
    assert f'data-testid="balance">{balance["balance_usd"]}<' in overview.text
    assert '<svg class="chart"' in overview.text and "<title>" in overview.text
    page = client.get("/console/statements", params={"month": "2025-11"})
    assert page.status_code == 200
    for field in ("opening_balance_usd", "topups_usd", "adjustments_usd", "charges_usd",
                  "written_off_usd", "closing_balance_usd"):
        assert f'<td class="n" data-line="{field}">{statement[field]}</td>' in page.text, field
    assert statement["reconciliation"] in html.unescape(page.text)
    assert "@media print" in client.get("/static/tollway.css").text
    csv_page = client.get("/console/statements", params={"month": "2025-11", "format": "csv"})
    assert f'closing balance,,,{statement["closing_balance_usd"]}' in csv_page.text.splitlines()


def test_keys_are_created_shown_once_and_revoked(as_alice: tuple[Books, TestClient]) -> None:
    books, client = as_alice
    created = post_form(client, "/console/keys", {
        "name": "from the console", "models": ["chat-a"],
        "quota_usd": "2.5", "expires_at": "2099-01-31"})
    assert created.status_code == 201, created.text
    secret = re.search(r'data-testid="new-secret">(tw-[\w-]+)<', created.text).group(1)
    prefix = secret[:10]
    listed = client.get("/console/keys").text
    assert secret not in listed and f"<code>{prefix}…</code>" in listed  # masked from now on
    with books.db.read() as conn:
        (key,) = [k for k in account_store.list_keys(conn, books.accounts["alice"])
                  if k.prefix == prefix]
    # no group: only the operator pins one (tests/test_security_review.py)
    assert (key.name, key.group, key.models) == ("from the console", None, ("chat-a",))
    assert key.quota_nano == 2_500_000_000
    assert key.expires_at_ms == 4073500800000  # 2099-01-31T00:00Z
    refused = post_form(client, "/console/keys", {"name": "x", "quota_usd": "-1"},
                        page="/console/keys")
    assert refused.status_code == 400 and "quota_usd" in refused.text
    revoked = post_form(client, f"/console/keys/{key.id}/revoke", {}, page="/console/keys")
    assert revoked.status_code == 303 and revoked.headers["location"] == "/console/keys"
    with books.db.read() as conn:
        assert account_store.get_key(conn, key.id).revoked_at_ms is not None


# ----------------------------------------------------------------------------- isolation


def test_a_customer_never_reaches_another_accounts_data(
        console: tuple[Books, TestClient]) -> None:
    books, client = console
    alice, bob = books.accounts["alice"], books.accounts["bob"]
    alice_key = books.keys["a-main"]
    bob_ids = {r["request_id"] for r in api_log(client, books, "b-main")}
    alice_ids = {r["request_id"] for r in api_log(client, books, "a-main")}
    client.cookies.clear()
    alice_page = api(client, books, "a-main", "/v1/billing/usage", limit=3).json()
    alice_cursor = alice_page["next_cursor"]
    assert login(client, "bob", PASSWORD).status_code == 303
    try:
        # every query parameter an account or a key of alice could be named in
        for params in ({"account": alice}, {"account_id": alice}, {"account": "alice"},
                       {"key": alice_key.id}, {"cursor": alice_cursor},
                       {"product": "chat-a", "key": alice_key.id}, {"limit": 500}):
            page = client.get("/console/usage", params={"limit": 500, **params})
            assert page.status_code == 200, params
            assert set(page_ids(page.text)) <= bob_ids, params
            assert not set(page_ids(page.text)) & alice_ids
            export = client.get("/console/usage/export", params=params)
            assert not any(rid in export.text for rid in alice_ids), params
        for path in ("/console", "/console/keys", "/console/statements",
                     "/console/notifications"):
            for params in ({"account": alice}, {"account_id": alice}, {"month": "2025-11",
                                                                       "account": alice}):
                page = client.get(path, params=params)
                assert page.status_code == 200
                assert "alice" not in page.text, (path, params)
                assert alice_key.prefix not in page.text
        assert "bob" in client.get("/console", params={"account": alice}).text
        # paths and forms naming alice's key or account
        revoke = post_form(client, f"/console/keys/{alice_key.id}/revoke", {},
                           page="/console/keys")
        assert revoke.status_code == 404
        with books.db.read() as conn:
            assert account_store.get_key(conn, alice_key.id).revoked_at_ms is None
        made = post_form(client, "/console/keys", {"name": "mine", "account_id": alice,
                                                    "account": "alice"})
        assert made.status_code == 201
        with books.db.read() as conn:
            assert [k.name for k in account_store.list_keys(conn, alice)] == [
                k.name for k in account_store.list_keys(conn, alice)
                if k.name != "mine"]
            assert "mine" in [k.name for k in account_store.list_keys(conn, bob)]
        for path in (f"/console/{alice}", f"/console/accounts/{alice}",
                     f"/console/usage/{next(iter(alice_ids))}"):
            assert client.get(path).status_code == 404, path
        # the session opens no API: /v1 routes take keys only
        assert client.get("/v1/billing/usage").status_code == 401
        assert client.get("/v1/billing/balance").status_code == 401
    finally:
        client.cookies.clear()


def _admin_paths(app: Any, account_id: int) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(route.routes, prefix + route.path)
            elif isinstance(route, Route) and (prefix + route.path).startswith("/admin"):
                path = re.sub(r"\{[^}]+\}", str(account_id), prefix + route.path)
                found.extend((m, path) for m in sorted(route.methods or ()) if m != "HEAD")
    walk(app.routes, "")
    return found


def test_a_customer_reaches_no_operator_page_or_route(
        console: tuple[Books, TestClient]) -> None:
    books, client = console
    bob = books.accounts["bob"]
    paths = _admin_paths(client.app, bob)
    assert ("GET", "/admin/v1/accounts") in paths and len(paths) > 15
    assert login(client, "bob", PASSWORD).status_code == 303
    token = csrf(client, "/console")
    try:
        for method, path in paths:
            if path in ("/admin/login", "/admin/logout"):
                continue
            response = client.request(method, path, data={"csrf_token": token},
                                      follow_redirects=False)
            if path.startswith("/admin/v1"):
                assert response.status_code == 401, (method, path)
                assert response.json()["error"]["code"] == "invalid_admin_token"
            else:  # operator pages send the customer to the operator's sign-in
                assert response.status_code in (303, 403), (method, path, response.status_code)
                if response.status_code == 303:
                    assert response.headers["location"].startswith("/admin/login")
        # and signing in as the operator needs the admin token, not a customer's password
        assert operator_login(client, PASSWORD).status_code == 401
    finally:
        client.cookies.clear()
