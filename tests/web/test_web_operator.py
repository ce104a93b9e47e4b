"""The operator's pages on SQLite and PostgreSQL: accounts, catalog, groups, usage and revenue.

Only an operator session reaches them: anonymous visitors and signed-in customers are sent
to the operator sign-in, and their form posts change nothing. Every form needs the session's
CSRF token. Money typed into a form is a decimal string; a top-up form submitted twice
credits once. A catalog file is previewed (exact diff, nothing written) before it is applied
through the same code as ``tollway catalog apply``.
"""

from __future__ import annotations

import html
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tollway import clock
from tollway.app import create_app
from tollway.billing import keys as key_ops
from tollway.billing import logins
from tollway.ledger import ledger
from tollway.pricing.catalog import load_catalog
from tollway.store import accounts as store
from tollway.store.catalog import apply_catalog, current_items, price_history
from tollway.store.db import Database
from tollway.store.tables import entries, price_versions

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette 1.x prefers httpx2 for its test client
    from starlette.testclient import TestClient

CATALOG = Path(__file__).resolve().parents[2] / "examples" / "catalog.yaml"
TOKEN = "adm-operator-pages"
NANO = 1_000_000_000
PASSWORD = "correct horse battery"
PAGES = ["/admin", "/admin/accounts", "/admin/accounts/1", "/admin/catalog", "/admin/groups",
         "/admin/usage", "/admin/channels"]


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """The demo catalog and alice (default group, 5 USD, a console password)."""
    database = Database(db_url)
    with database.write() as conn:
        apply_catalog(conn, load_catalog(CATALOG), now_ms=clock.now_ms())
        alice = logins.create_account(conn, "alice", "default", email="alice@example.com",
                                      password_hash=logins.hash_password(PASSWORD))
        ledger.topup(conn, alice.id, 5 * NANO, idempotency_key="seed", at_ms=clock.now_ms())
    yield database
    database.dispose()


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(database_url=db.url, admin_token=TOKEN)) as c:
        yield c


def alice(db: Database) -> store.Account:
    with db.read() as conn:
        return store.find_account(conn, "alice")


def csrf(text: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', text)
    assert found, text
    return found.group(1)


def nonce(text: str, form: str) -> str:
    found = re.search(rf'action="[^"]*/{form}"[^>]*>.*?name="nonce" value="([^"]+)"', text,
                      re.S)
    assert found, text
    return found.group(1)


def sign_in_operator(client: TestClient) -> str:
    """Sign in with the admin token; the CSRF token of the operator's session."""
    token = csrf(client.get("/admin/login").text)
    response = client.post("/admin/login", data={"csrf_token": token, "token": TOKEN,
                                                  "next": "/admin/accounts"})
    assert response.status_code == 200 and response.url.path == "/admin/accounts"
    return csrf(response.text)


def sign_in_customer(client: TestClient, login: str = "alice@example.com",
                     password: str = PASSWORD) -> str:
    token = csrf(client.get("/login").text)
    response = client.post("/login", data={"csrf_token": token, "login": login,
                                           "password": password, "next": "/console"},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/console"
    return csrf(client.get("/console").text)


def errors(text: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'class="error" role="alert">([^<]*)<', text)]


def post(client: TestClient, path: str, data: dict[str, str], status: int = 303) -> Any:
    response = client.post(path, data=data, follow_redirects=False)
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    return response


# --------------------------------------------------------------------------- who may enter


def test_anonymous_visitors_are_sent_to_the_operator_sign_in(client: TestClient,
                                                             db: Database) -> None:
    for path in PAGES:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/admin/login?next=/admin"), path
    account_id = alice(db).id
    for action in ("topup", "adjust", "group", "disable"):
        response = post(client, f"/admin/accounts/{account_id}/{action}",
                        {"amount_usd": "100", "note": "x", "group": "vip", "nonce": "n" * 22})
        assert response.headers["location"].startswith("/admin/login")
    post(client, "/admin/accounts", {"name": "mallory"})
    post(client, "/admin/catalog/apply", {"catalog": "providers: {}"})
    after = alice(db)
    assert (after.available_nano, after.group, after.disabled_at_ms) == (5 * NANO, "default",
                                                                         None)
    with db.read() as conn:
        assert [a.name for a in store.list_accounts(conn)] == ["alice"]
        assert len(current_items(conn, now_ms=clock.now_ms())) == 8


def test_a_signed_in_customer_is_not_an_operator(client: TestClient, db: Database) -> None:
    token = sign_in_customer(client)
    for path in PAGES:
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/admin/login"), path
    account_id = alice(db).id
    post(client, f"/admin/accounts/{account_id}/topup",
         {"csrf_token": token, "amount_usd": "100", "nonce": "n" * 22})
    post(client, f"/admin/accounts/{account_id}/group", {"csrf_token": token, "group": "vip"})
    assert alice(db).available_nano == 5 * NANO
    assert alice(db).group == "default"


def test_forms_without_the_sessions_csrf_token_are_refused(client: TestClient,
                                                          db: Database) -> None:
    sign_in_operator(client)
    account_id = alice(db).id
    for token in (None, "", "forged"):
        data = {"amount_usd": "1", "nonce": "n" * 22}
        if token is not None:
            data["csrf_token"] = token
        response = post(client, f"/admin/accounts/{account_id}/topup", data, 403)
        assert response.headers["content-type"].startswith("text/html")
    assert alice(db).available_nano == 5 * NANO


# --------------------------------------------------------------------------- accounts


def test_the_accounts_list_shows_balances_groups_and_status(client: TestClient,
                                                            db: Database) -> None:
    with db.write() as conn:
        bob = store.create_account(conn, "bob", "vip", at_ms=clock.now_ms())
        ledger.topup(conn, bob.id, 2 * NANO, idempotency_key="bob", at_ms=clock.now_ms())
        hold = ledger.place_hold(conn, bob.id, 500_000_000, idempotency_key="h", ttl_ms=60_000,
                                 at_ms=clock.now_ms())
        ledger.settle_hold(conn, hold.id, 123_456_789, idempotency_key="s", at_ms=clock.now_ms())
        ledger.place_hold(conn, bob.id, 250_000_000, idempotency_key="h2", ttl_ms=60_000,
                          at_ms=clock.now_ms())
        logins.disable_account(conn, bob.id)
    sign_in_operator(client)
    text = client.get("/admin/accounts").text
    row = re.search(r'<tr data-account="bob">(.*?)</tr>', text, re.S)
    assert row is not None
    cells = [re.sub(r"<[^>]+>", " ", c).split() for c in
             re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row.group(1), re.S)]
    assert cells == [[str(bob.id)], ["bob"], ["vip"], ["1.626543211"], ["0.250000000"],
                     ["0.123456789"], ["1"], ["disabled"]]


def test_create_an_account_with_a_console_login(client: TestClient, db: Database) -> None:
    token = sign_in_operator(client)
    response = post(client, "/admin/accounts", {
        "csrf_token": token, "name": "carol", "group": "vip", "email": "Carol@Example.com",
        "password": "a long password"})
    with db.read() as conn:
        carol = store.find_account(conn, "carol")
    assert response.headers["location"] == f"/admin/accounts/{carol.id}?done=created"
    assert (carol.group, carol.email, carol.has_password) == ("vip", "carol@example.com", True)
    page = client.get(response.headers["location"]).text
    assert "Account created." in page
    # the new customer signs in with that email and password (in another browser)
    sign_in_customer(TestClient(client.app), "carol@example.com", "a long password")


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "alice"}, "an account named 'alice' already exists"),
    ({"name": ""}, "an account name must be 1 to 200 characters"),
    ({"name": "dave", "group": "gold"}, "unknown group 'gold' (known: default, vip)"),
    ({"name": "dave", "email": "not-an-email"}, "'not-an-email' is not an email address"),
    ({"name": "dave", "email": "ALICE@example.com"},
     "another account already uses this email address"),
    ({"name": "dave", "password": "short"}, "a password must be 8 to 1024 characters"),
])
def test_account_creation_errors_are_shown_on_the_form(client: TestClient, db: Database,
                                                       fields: dict[str, str],
                                                       message: str) -> None:
    token = sign_in_operator(client)
    response = post(client, "/admin/accounts", {"csrf_token": token, **fields}, 400)
    assert errors(response.text) == [message]
    assert 'name="name" required maxlength="200" value="' + html.escape(fields["name"]) \
        in response.text  # what was typed is kept
    with db.read() as conn:
        assert [a.name for a in store.list_accounts(conn)] == ["alice"]


def test_a_topup_form_submitted_twice_credits_once(client: TestClient, db: Database) -> None:
    token = sign_in_operator(client)
    account_id = alice(db).id
    page = client.get(f"/admin/accounts/{account_id}").text
    form = {"csrf_token": token, "nonce": nonce(page, "topup"), "amount_usd": "12.5",
            "note": "invoice 42"}
    first = post(client, f"/admin/accounts/{account_id}/topup", form)
    second = post(client, f"/admin/accounts/{account_id}/topup", form)
    assert first.headers["location"] == second.headers["location"] == \
        f"/admin/accounts/{account_id}?done=topup"
    assert alice(db).available_nano == 17_500_000_000
    page = client.get(first.headers["location"]).text
    assert "Top-up credited." in page
    assert '<span class="value" data-field="available">17.500000000</span>' in page
    with db.read() as conn:
        topups = conn.execute(sa.select(entries.c.amount_nano, entries.c.note).where(
            entries.c.account_id == account_id, entries.c.kind == "topup")).all()
    assert sorted(topups) == [(5 * NANO, None), (12_500_000_000, "invoice 42")]
    # a fresh form (a new page) is a new top-up
    post(client, f"/admin/accounts/{account_id}/topup",
         {"csrf_token": token, "nonce": nonce(page, "topup"), "amount_usd": "0.000000001"})
    assert alice(db).available_nano == 17_500_000_001


@pytest.mark.parametrize(("action", "amount", "note", "message"), [
    ("topup", "abc", "", "amount_usd 'abc' is not a number"),
    ("topup", "-1", "", "amount_usd must not be negative, got '-1'"),
    ("topup", "0", "", "amount_usd must be greater than zero"),
    ("topup", "1.0000000001", "", "amount_usd '1.0000000001' has more than 9 decimal places"),
    ("topup", "", "", "amount_usd '' is not a number"),
    ("adjust", "-1", "", "a note is required: say why the balance is adjusted"),
    ("adjust", "0", "why", "amount_usd must be greater than zero"),
    ("adjust", "-5.000000001", "too much",
     "cannot debit 5.000000001 USD: account {id} has 5.000000000 USD available"),
])
def test_money_input_errors_are_shown_on_the_form(client: TestClient, db: Database,
                                                  action: str, amount: str, note: str,
                                                  message: str) -> None:
    token = sign_in_operator(client)
    account_id = alice(db).id
    page = client.get(f"/admin/accounts/{account_id}").text
    response = client.post(f"/admin/accounts/{account_id}/{action}", data={
        "csrf_token": token, "nonce": nonce(page, action), "amount_usd": amount, "note": note})
    assert 400 <= response.status_code < 500
    assert response.headers["content-type"].startswith("text/html")
    assert errors(response.text) == [message.format(id=account_id)]
    assert alice(db).available_nano == 5 * NANO


def test_adjust_change_group_disable_and_enable(client: TestClient, db: Database) -> None:
    token = sign_in_operator(client)
    account_id = alice(db).id
    page = client.get(f"/admin/accounts/{account_id}").text
    post(client, f"/admin/accounts/{account_id}/adjust", {
        "csrf_token": token, "nonce": nonce(page, "adjust"), "amount_usd": "-1.25",
        "note": "refund of a duplicate top-up"})
    assert alice(db).available_nano == 3_750_000_000
    post(client, f"/admin/accounts/{account_id}/group", {"csrf_token": token, "group": "vip"})
    assert alice(db).group == "vip"
    response = post(client, f"/admin/accounts/{account_id}/group",
                    {"csrf_token": token, "group": "gold"}, 400)
    assert errors(response.text) == ["unknown group 'gold' (known: default, vip)"]
    with db.write() as conn:
        key = key_ops.create_key(conn, account_id, at_ms=clock.now_ms(), name="k")
    quote = "/apis/v1/finance/quote/AAPL"
    bearer = {"Authorization": f"Bearer {key.secret}"}
    assert client.get(quote, headers=bearer).status_code == 200
    post(client, f"/admin/accounts/{account_id}/disable", {"csrf_token": token})
    assert alice(db).disabled_at_ms is not None
    refused = client.get(quote, headers=bearer)
    assert refused.json()["error"]["code"] == "account_disabled"
    other = TestClient(client.app)  # nor can the customer sign in (in another browser)
    token_c = csrf(other.get("/login").text)
    assert other.post("/login", data={"csrf_token": token_c, "login": "alice",
                                      "password": PASSWORD}).status_code == 401
    page = client.get(f"/admin/accounts/{account_id}?done=disable").text
    assert "Account disabled" in page
    assert f'action="/admin/accounts/{account_id}/enable"' in page
    post(client, f"/admin/accounts/{account_id}/enable", {"csrf_token": token})
    assert alice(db).disabled_at_ms is None
    with db.read() as conn:
        adjustments = conn.execute(sa.select(entries.c.amount_nano, entries.c.note).where(
            entries.c.account_id == account_id, entries.c.kind == "adjust")).all()
    assert adjustments == [(-1_250_000_000, "refund of a duplicate top-up")]


def test_unknown_accounts_are_an_html_404(client: TestClient) -> None:
    token = sign_in_operator(client)
    for path in ("/admin/accounts/999999", "/admin/accounts/99999999999999999999999"):
        response = client.get(path)
        assert response.status_code == 404
        assert "no account with id" in response.text
    response = client.post("/admin/accounts/999999/topup",
                           data={"csrf_token": token, "amount_usd": "1", "nonce": "n" * 22})
    assert response.status_code == 404 and "<!doctype html>" in response.text
    response = client.post("/admin/accounts/1/delete", data={"csrf_token": token})
    assert response.status_code == 404 and "no account form &#39;delete&#39;" in response.text


# --------------------------------------------------------------------------- catalog

NEW_CATALOG = """
providers:
  sandbox: {kind: sandbox}
  sandbox-backup: {kind: sandbox}
groups:
  default: {ratio: "1"}
  vip: {ratio: "0.75"}
  gold: {ratio: "0.5"}
models:
  - id: sandbox-chat
    channels:
      - {provider: sandbox}
      - {provider: sandbox-backup, priority: 1, cost: {input: "0.12", output: "0.50"}}
    cost: {input: "0.10", output: "0.40"}
    price: {input: "0.15", output: "0.60", cache_read: "0.075"}
    max_output_tokens: 4096
    group_ratios: {vip: "0.65"}
  - id: sandbox-reasoner
    provider: sandbox
    price: {input: "3.00", output: "12.00", cache_read: "1.25", cache_write: "3.125"}
    max_output_tokens: 8192
  - id: sandbox-embed
    provider: sandbox
    price: {input: 0.02, output: 0}
    max_output_tokens: 1
    routes: [/v1/embeddings]
endpoints:
  - id: web-search
    name: Web search
    provider: sandbox
    method: GET
    path: /search/web
    price: {per_call: "0.0025"}
  - id: stock-quote
    name: Stock quote
    provider: sandbox
    method: GET
    path: /finance/quote/{symbol}
    price: {per_call: "0.0005"}
  - id: weather
    name: Weather
    provider: sandbox
    method: GET
    path: /weather/{city}
    price: {per_call: "0.001"}
"""


def table(text: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', text, re.S)
    assert body is not None, text
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)]


def items(text: str, list_id: str) -> list[str]:
    body = re.search(rf'<ul id="{list_id}">(.*?)</ul>', text, re.S)
    assert body is not None, list_id
    return [html.unescape(re.sub(r"<[^>]+>", "", li)).strip()
            for li in re.findall(r"<li>(.*?)</li>", body.group(1), re.S)]


def version_count(db: Database) -> int:
    with db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(price_versions))
                   .scalar_one())


def test_catalog_preview_lists_the_exact_changes_and_writes_nothing(
        client: TestClient, db: Database) -> None:
    token = sign_in_operator(client)
    before = version_count(db)
    response = client.post("/admin/catalog/preview",
                           data={"csrf_token": token, "catalog": NEW_CATALOG})
    assert response.status_code == 200, response.text
    text = response.text
    assert "3 models, 3 endpoints, 3 groups. Nothing has been written yet." in text
    assert items(text, "added") == ["weather"]
    assert items(text, "removed") == ["sandbox-claude", "sandbox-image", "scholar-search"]
    assert table(text, "changes") == [
        ["sandbox-chat", "group ratios", "vip ×0.7", "vip ×0.65"],
        ["sandbox-reasoner", "price",
         ("$2.500000 / 1M input tokens; $10.000000 / 1M output tokens; "
          "$1.250000 / 1M cached input tokens; $3.125000 / 1M cache-write tokens"),
         ("$3.000000 / 1M input tokens; $12.000000 / 1M output tokens; "
          "$1.250000 / 1M cached input tokens; $3.125000 / 1M cache-write tokens")],
        ["web-search", "price", "$0.002000 / per call", "$0.002500 / per call"],
    ]
    assert items(text, "groups") == ["new group gold ×0.5", "group vip ratio ×0.8 → ×0.75"]
    assert [line.split(" effective ")[0] for line in items(text, "new-versions")] == [
        "sandbox-chat", "sandbox-reasoner", "web-search", "weather"]
    assert 'action="/admin/catalog/apply"' in text
    assert version_count(db) == before
    with db.read() as conn:
        assert {i.id for i in current_items(conn, now_ms=clock.now_ms())} == {
            "sandbox-chat", "sandbox-reasoner", "sandbox-embed", "sandbox-claude",
            "sandbox-image", "web-search", "stock-quote", "scholar-search"}

    # confirming applies it: new price versions, the old ones kept, scholar-search gone
    confirm = re.search(r'<textarea name="catalog" hidden[^>]*>(.*?)</textarea>', text, re.S)
    assert confirm is not None and html.unescape(confirm.group(1)) == NEW_CATALOG
    applied = client.post("/admin/catalog/apply",
                          data={"csrf_token": token, "catalog": html.unescape(confirm.group(1))})
    assert applied.status_code == 200
    assert [line.split(" effective ")[0] for line in items(applied.text, "new-versions")] == [
        "sandbox-chat", "sandbox-reasoner", "web-search", "weather"]
    assert "No longer listed: sandbox-claude, sandbox-image, scholar-search" in applied.text
    assert version_count(db) == before + 4
    with db.read() as conn:
        history = price_history(conn, "web-search")
        assert [str(v.price.per_call) for v in history] == [  # type: ignore[union-attr]
            "0.002000000", "0.002500000"]
    market = {i["id"]: i for i in client.get("/v1/marketplace").json()["data"]}
    assert market["web-search"]["price_display"] == ["$0.002500 / per call"]
    assert market["weather"]["path"] == "/apis/v1/weather/{city}"
    assert "scholar-search" not in market
    catalog_page = client.get("/admin/catalog").text
    row = catalog_page.split('data-item="web-search"')[1].split("</tr>")[0]
    assert "2 versions" in row and "$0.002000 / per call" in row and "(earlier)" in row
    assert "(in effect)" in row
    # applying the same file again changes nothing
    again = client.post("/admin/catalog/preview",
                        data={"csrf_token": token, "catalog": NEW_CATALOG})
    assert "No changes: every item, price and group ratio is already as in this file." \
        in again.text
    assert 'id="new-versions"' not in again.text


def test_catalog_file_upload(client: TestClient, db: Database) -> None:
    token = sign_in_operator(client)
    response = client.post("/admin/catalog/preview", data={"csrf_token": token},
                           files={"file": ("prices.yaml", NEW_CATALOG.encode(), "text/yaml")})
    assert response.status_code == 200
    assert "<h1>Preview: prices.yaml</h1>" in response.text
    assert items(response.text, "added") == ["weather"]


@pytest.mark.parametrize(("text", "problems"), [
    ("models: [1", [("the catalog text: line 1, column 11: not valid YAML: expected ',' or "
                    "']', but got '<stream end>' (while parsing a flow sequence from line 1, "
                    "column 9)")]),
    ("providers: {}\nmodels:\n  - {id: m, provider: nowhere, price: {input: 1, output: 2}}",
     ["the catalog text: models[m].provider: unknown provider 'nowhere' (known: none defined)"]),
    ("groups: {vip: {ratio: \"-1\"}}",
     ["the catalog text: groups[vip].ratio: must be greater than 0, got -1"]),
    ("   ", ["the catalog text: empty; paste a catalog or choose a file"]),
])
def test_invalid_catalogs_show_the_loaders_message(client: TestClient, db: Database,
                                                   text: str, problems: list[str]) -> None:
    token = sign_in_operator(client)
    before = version_count(db)
    for path in ("/admin/catalog/preview", "/admin/catalog/apply"):
        response = client.post(path, data={"csrf_token": token, "catalog": text})
        assert response.status_code == 400
        shown = [html.unescape(p) for p in re.findall(r"<li><code>(.*?)</code></li>",
                                                      response.text, re.S)]
        assert len(shown) == len(problems)
        for got, expected in zip(shown, problems, strict=True):
            assert got.startswith(expected), got
        assert "The catalog was not applied:" in response.text
        assert "Traceback" not in response.text
    assert version_count(db) == before


def test_a_preview_shows_why_the_apply_would_be_refused(client: TestClient,
                                                        db: Database) -> None:
    with db.write() as conn:
        store.create_account(conn, "vip-customer", "vip", at_ms=clock.now_ms())
    token = sign_in_operator(client)
    without_vip = CATALOG.read_text().replace('  vip:     {ratio: "0.8"}\n', "").replace(
        "    group_ratios: {vip: \"0.7\"}\n", "")
    response = client.post("/admin/catalog/preview",
                           data={"csrf_token": token, "catalog": without_vip})
    assert response.status_code == 200
    assert "Applying this file would be refused:" in response.text
    assert html.unescape(response.text).count(
        "group 'vip' is missing from the file but 1 accounts or keys belong to it") == 1
    assert 'action="/admin/catalog/apply"' not in response.text
    assert items(response.text, "groups") == ["group vip (×0.8) removed"]


# --------------------------------------------------------------------------- groups, usage


def test_groups_page(client: TestClient, db: Database) -> None:
    with db.write() as conn:
        store.create_account(conn, "bob", "vip", at_ms=clock.now_ms())
        store.create_account(conn, "carol", "vip", at_ms=clock.now_ms())
    sign_in_operator(client)
    text = client.get("/admin/groups").text
    rows = {name: re.sub(r"<[^>]+>", " ", row).split() for name, row in
            re.findall(r'<tr data-group="([^"]+)">(.*?)</tr>', text, re.S)}
    assert rows == {"default": ["default", "×1", "1"], "vip": ["vip", "×0.8", "2"]}
    assert "<li><code>sandbox-chat</code>: vip ×0.7</li>" in text


def test_usage_and_revenue_by_account_and_by_product(client: TestClient,
                                                     db: Database) -> None:
    """Per-call prices make the revenue easy to check by hand: alice (default) calls
    stock-quote twice (2 × 0.0005), bob (vip, ×0.8) calls scholar-search once (0.02 × 0.8)."""
    now = clock.now_ms()
    with db.write() as conn:
        bob = store.create_account(conn, "bob", "vip", at_ms=now)
        ledger.topup(conn, bob.id, NANO, idempotency_key="bob", at_ms=clock.now_ms())
        alice_key = key_ops.create_key(conn, alice(db).id, at_ms=now).secret
        bob_key = key_ops.create_key(conn, bob.id, at_ms=now).secret
    for symbol in ("AAPL", "MSFT"):
        assert client.get(f"/apis/v1/finance/quote/{symbol}",
                          headers={"Authorization": f"Bearer {alice_key}"}).status_code == 200
    assert client.post("/apis/v1/scholar/search", json={"query": "ledgers"},
                       headers={"Authorization": f"Bearer {bob_key}"}).status_code == 200
    sign_in_operator(client)
    text = client.get("/admin/usage").text

    def section(title: str) -> list[list[str]]:
        part = text.split(f"<h2>{title}</h2>")[1].split("</table>")[0]
        return [re.sub(r"<[^>]+>", " ", row).split()
                for row in re.findall(r"<tr>(.*?)</tr>", part, re.S)][1:]  # after the header

    assert section("By account") == [
        ["alice", "2", "0", "0", "0", "2", "0.001000000"],
        ["bob", "1", "0", "0", "0", "1", "0.016000000"],
        ["Total", "3", "0", "0", "0", "3", "0.017000000"]]
    assert section("By product") == [
        ["scholar-search", "1", "0", "0", "0", "1", "0.016000000"],
        ["stock-quote", "2", "0", "0", "0", "2", "0.001000000"],
        ["Total", "3", "0", "0", "0", "3", "0.017000000"]]
    # a period before any usage is empty; a bad date is shown, not a stack trace
    assert "No usage in this period." in client.get(
        "/admin/usage?start=2020-01-01&end=2020-01-31").text
    bad = client.get("/admin/usage?start=yesterday")
    assert bad.status_code == 400
    assert errors(bad.text) == ["dates are YYYY-MM-DD, got 'yesterday'"]
    reversed_period = client.get("/admin/usage?start=2020-02-01&end=2020-01-01")
    assert errors(reversed_period.text) == ["the end date is before the start date"]


def test_channels_page_shows_states_and_disables_and_enables(client: TestClient,
                                                             db: Database) -> None:
    from tollway.store.channels import disabled_channels

    token = sign_in_operator(client)
    text = client.get("/admin/channels").text
    rows = dict(re.findall(r'<tr data-channel="([^"]+)">.*?data-state="([^"]+)"', text, re.S))
    assert rows["sandbox-chat/sandbox"] == "closed"
    assert rows["sandbox-chat/sandbox-backup"] == "closed"
    assert rows["web-search/sandbox"] == "closed"
    post(client, "/admin/channels/toggle", {"csrf_token": token,
                                            "id": "sandbox-chat/sandbox", "enabled": "false"})
    with db.read() as conn:
        assert disabled_channels(conn) == {"sandbox-chat/sandbox"}
    text = client.get("/admin/channels?done=disabled").text
    rows = dict(re.findall(r'<tr data-channel="([^"]+)">.*?data-state="([^"]+)"', text, re.S))
    assert rows["sandbox-chat/sandbox"] == "disabled"
    post(client, "/admin/channels/toggle", {"csrf_token": token,
                                            "id": "sandbox-chat/sandbox", "enabled": "true"})
    with db.read() as conn:
        assert disabled_channels(conn) == set()
    post(client, "/admin/channels/toggle", {"id": "sandbox-chat/sandbox", "enabled": "false",
                                            "csrf_token": "forged"}, status=403)
    with db.read() as conn:
        assert disabled_channels(conn) == set()
