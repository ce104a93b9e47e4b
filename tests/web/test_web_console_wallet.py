"""The console's "Redeem a code" form and its notifications page, on SQLite and PostgreSQL.

Redeeming goes through ``billing.codes.redeem`` (the same function as ``POST
/v1/billing/redeem``): a code worth 12.34 USD credits exactly 12_340_000_000 nano-USD, once;
a second try, an unknown code and an expired code each show their error on the form and
credit nothing. The notifications page edits the settings ``billing.notifications`` keeps and
lists the account's events with every delivery attempt. The server's own deliverer is off
(``TOLLWAY_NOTIFY_INTERVAL_SECONDS=0``), so the attempts shown are exactly the ones made here.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator

import pytest

from tollway import clock
from tollway.app import create_app
from tollway.billing import codes, credits, logins
from tollway.billing import notifications as notify
from tollway.store import accounts as account_store
from tollway.store import notifications as notify_store
from tollway.store.db import Database
from webclient import TestClient, csrf, login, post_form

PASSWORD = "wallet pass 1"
NANO = 1_000_000_000


@pytest.fixture
def client(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("TOLLWAY_NOTIFY_INTERVAL_SECONDS", "0")
    with db.write() as conn:
        for name in ("alice", "bob"):
            logins.create_account(conn, name, "default", email=f"{name}@example.com",
                                  password_hash=logins.hash_password(PASSWORD))
    with TestClient(create_app(database_url=db.url, admin_token="adm-wallet")) as c:
        assert login(c, "alice", PASSWORD).status_code == 303
        yield c


def available(db: Database, name: str) -> int:
    with db.read() as conn:
        account = next(a for a in account_store.list_accounts(conn) if a.name == name)
        return account.available_nano


def mint(db: Database, amount_nano: int, *, expires_in_ms: int | None = None) -> str:
    now = clock.now_ms()
    at = now if expires_in_ms is None or expires_in_ms > 0 else now + expires_in_ms - 1000
    expires = None if expires_in_ms is None else now + expires_in_ms
    with db.write() as conn:
        (new,) = codes.mint(conn, amount_nano, at_ms=at, expires_at_ms=expires)
    return new.code


def redeem(client: TestClient, code: str) -> tuple[int, str]:
    response = post_form(client, "/console/redeem", {"code": code}, page="/console")
    return response.status_code, html.unescape(response.text)


def alert(text: str) -> str:
    found = re.search(r'data-testid="redeem-error">(.*?)</p>', text, re.S)
    assert found is not None
    return found.group(1)


def test_redeeming_a_code_credits_exactly_its_amount_once(client: TestClient,
                                                          db: Database) -> None:
    code = mint(db, 12_340_000_000)  # 12.34 USD
    assert available(db, "alice") == 0
    status, text = redeem(client, code.lower())  # typed in lower case: the same code
    assert status == 200
    assert "Code redeemed: 12.340000000 USD of promotional credit." in text
    assert 'data-testid="balance">12.340000000<' in text
    assert 'data-testid="promotional">12.340000000<' in text  # a grant, spent first
    assert 'data-testid="paid">0.000000000<' in text
    assert available(db, "alice") == 12_340_000_000

    status, text = redeem(client, code)
    assert status == 409
    assert alert(text).startswith("this code was already redeemed at ")
    assert available(db, "alice") == 12_340_000_000  # nothing more
    assert 'data-testid="balance">12.340000000<' in text


def test_unknown_and_expired_codes_show_their_error_and_credit_nothing(
        client: TestClient, db: Database) -> None:
    status, text = redeem(client, "TW-0000-0000-0000-0000")
    assert (status, alert(text)) == (404, "this is not a valid redemption code")
    status, text = redeem(client, "not a code")
    assert (status, alert(text)) == (404, "this is not a valid redemption code")
    status, text = redeem(client, "   ")
    assert (status, alert(text)) == (400, "enter the code you were given")
    expired = mint(db, 5 * NANO, expires_in_ms=-1)
    status, text = redeem(client, expired)
    assert status == 410 and alert(text).startswith("this code expired at ")
    assert available(db, "alice") == 0
    # the form needs the session's CSRF token
    response = client.post("/console/redeem", data={"code": expired}, follow_redirects=False)
    assert response.status_code == 403
    # bob redeems a code alice could not: the credit goes to the signed-in account only
    fresh = mint(db, 3 * NANO)
    assert login(client, "bob", PASSWORD).status_code == 303
    assert redeem(client, fresh)[0] == 200
    assert (available(db, "alice"), available(db, "bob")) == (0, 3 * NANO)


def test_notification_settings_are_edited_on_the_page(client: TestClient,
                                                      db: Database) -> None:
    page = client.get("/console/notifications")
    assert page.status_code == 200 and "No notifications yet." in page.text
    response = post_form(client, "/console/notifications", {
        "low_balance_threshold_usd": "2.5", "webhook_url": "https://hooks.example.com/tw",
        "email": "ops@example.com"})
    assert response.status_code == 303
    assert response.headers["location"] == "/console/notifications?saved=1"
    with db.read() as conn:
        account_id = next(a.id for a in account_store.list_accounts(conn) if a.name == "alice")
        saved = notify.current(conn, account_id)
    assert (saved["low_balance_threshold_usd"], saved["webhook_url"], saved["email"]) == (
        "2.500000000", "https://hooks.example.com/tw", "ops@example.com")
    text = client.get("/console/notifications?saved=1").text
    assert "Settings saved." in text
    assert 'name="low_balance_threshold_usd" inputmode="decimal" value="2.500000000"' in text
    assert saved["webhook_secret"] in text

    bad = post_form(client, "/console/notifications", {
        "low_balance_threshold_usd": "2.5", "webhook_url": "ftp://example.com", "email": ""})
    assert bad.status_code == 400
    assert "webhook_url must be an http:// or https:// URL" in html.unescape(bad.text)
    assert 'value="ftp://example.com"' in bad.text  # what was typed stays in the form
    with db.read() as conn:
        assert notify.current(conn, account_id)["webhook_url"] == "https://hooks.example.com/tw"

    # clearing a field turns it off
    assert post_form(client, "/console/notifications", {
        "low_balance_threshold_usd": "", "webhook_url": "https://hooks.example.com/tw",
        "email": ""}).status_code == 303
    with db.read() as conn:
        cleared = notify.current(conn, account_id)
    assert (cleared["low_balance_threshold_usd"], cleared["email"]) == (None, None)


def test_recent_deliveries_show_each_attempt(client: TestClient, db: Database) -> None:
    assert post_form(client, "/console/notifications", {
        "low_balance_threshold_usd": "", "webhook_url": "https://hooks.example.com/tw",
        "email": ""}).status_code == 303
    with db.write() as conn:
        account_id = next(a.id for a in account_store.list_accounts(conn) if a.name == "alice")
        credits.topup(conn, account_id, 7 * NANO, idempotency_key="wallet-1", at_ms=clock.now_ms())
    now = clock.now_ms()
    with db.write() as conn:  # one failed attempt, as the deliverer would record it
        (claimed,) = notify_store.claim(conn, now_ms=now, lease_ms=60_000, limit=10)
        notify_store.record_attempt(conn, claimed, target="https://hooks.example.com/tw",
                                    started_at_ms=now, duration_ms=12, status_code=500,
                                    error="HTTP 500", now_ms=now, retry_at_ms=now + 30_000)
    text = html.unescape(client.get("/console/notifications").text)
    rows = re.findall(r"<tr data-event=\"evt_[0-9a-f]+\">(.*?)</tr>", text, re.S)
    assert len(rows) == 1
    cells = [re.sub(r"<[^>]+>", "", c).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", rows[0], re.S)]
    assert cells[1:3] == ["balance.topup", "webhook"]
    assert cells[3].startswith("pending (next try ")
    assert cells[4] == "1"
    assert cells[5].startswith("#1 ") and cells[5].endswith(
        "https://hooks.example.com/tw: HTTP 500 (HTTP 500), 12 ms")
    # other customers' events never show
    assert login(client, "bob", PASSWORD).status_code == 303
    assert "No notifications yet." in client.get("/console/notifications").text
    assert csrf(client, "/console/notifications")
