"""End to end in headless Chromium against a real ``tollway serve`` with the sandbox catalog.

A new customer (created by the operator with an initial password and $5.00 of credit) signs
in, creates a key in the console, uses it with the official ``openai`` client for a chat
request and with httpx for a per-call data API, then finds both in the usage log with their
exact costs, the expanded pricing row, and the balance reduced by exactly their sum.
Screenshots of every page go to var/screenshots/ (the overview and usage log are also the
README's, in docs/screenshots/).

Costs, by hand, from examples/catalog.yaml (group default, ratio 1):
- sandbox-chat, "hello sandbox": prompt 2 tokens + 3 (message) + 3 (reply) = 8, completion
  "You said: hello sandbox" = 5 tokens: (8 x 0.15 + 5 x 0.60) / 1e6 = 0.0000042 USD (no
  cache reads or writes; a cache write is priced as input, 0.15, when the catalog sets none).
- web-search: 1 call x 0.002 = 0.002 USD.
Together 0.0020042 USD; the balance goes from 5.000000000 to 4.997995800.
"""

from __future__ import annotations

import json
import shutil
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import ROOT, Server
from openai import OpenAI

from fakes import IGNORE_TOKENIZER_WARNING

pytestmark = pytest.mark.filterwarnings(IGNORE_TOKENIZER_WARNING)

CHAT_COST = "0.000004200"
CALL_COST = "0.002000000"
BALANCE_AFTER = "4.997995800"
PASSWORD = "e2e console password"


def nav(page: Any, name: str) -> None:
    """Follow a link of the main navigation."""
    page.get_by_role("navigation", name="Main").get_by_role("link", name=name).click()


def _operator_creates_customer(server: Server) -> tuple[str, str]:
    admin = {"Authorization": f"Bearer {server.admin_token}"}
    name = f"e2e-{uuid.uuid4().hex[:8]}"
    email = f"{name}@example.com"
    created = httpx.post(f"{server.base_url}/admin/v1/accounts", headers=admin,
                         json={"name": name, "email": email, "password": PASSWORD})
    assert created.status_code == 201, created.text
    topup = httpx.post(f"{server.base_url}/admin/v1/accounts/{name}/topups", headers=admin,
                       json={"amount_usd": "5.00", "note": "e2e credit"})
    assert topup.status_code == 201, topup.text
    return name, email


def test_a_new_customer_sees_exact_costs_in_the_console(
        server: Server, browser: Any, shot: Any) -> None:
    name, email = _operator_creates_customer(server)
    context = browser.new_context(base_url=server.base_url,
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        # sign in
        page.goto("/console")
        assert page.url.endswith("/login?next=/console")
        shot(page, "login")
        page.get_by_label("Email or account name").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/console")
        assert page.get_by_test_id("balance").inner_text() == "5.000000000"

        # create a key; the secret is shown once
        nav(page, "Keys")
        page.get_by_label("Name").fill("e2e key")
        page.get_by_role("button", name="Create key").click()
        secret = page.get_by_test_id("new-secret").inner_text().strip()
        assert secret.startswith("tw-") and len(secret) > 40
        shot(page, "keys")

        # a chat request with the official client and a per-call request with httpx
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key=secret, max_retries=0)
        completion = client.chat.completions.with_raw_response.create(
            model="sandbox-chat", messages=[{"role": "user", "content": "hello sandbox"}])
        parsed = completion.parse()
        assert parsed.usage is not None
        assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens) == (8, 5)
        assert completion.headers["x-tollway-cost-usd"] == CHAT_COST
        call = httpx.get(f"{server.base_url}/apis/v1/search/web", params={"q": "tollway"},
                         headers={"Authorization": f"Bearer {secret}"})
        assert call.status_code == 200, call.text
        assert call.headers["x-tollway-cost-usd"] == CALL_COST

        # both in the usage log, with their exact costs and the pricing explanation
        nav(page, "Usage")
        page.wait_for_url("**/console/usage")
        rows = page.locator("#usage tbody tr[data-request-id]")
        consumed = {row.locator(".col-product").inner_text(): row
                    for row in rows.all() if row.locator(".col-type").inner_text() == "consume"}
        assert set(consumed) == {"sandbox-chat", "web-search"}
        assert consumed["sandbox-chat"].get_by_test_id("cost").inner_text() == CHAT_COST
        assert consumed["web-search"].get_by_test_id("cost").inner_text() == CALL_COST
        chat_id = consumed["sandbox-chat"].get_attribute("data-request-id")
        chat = page.locator(f'tr[data-pricing-for="{chat_id}"]')
        chat.locator("summary").click()
        pricing = json.loads(chat.get_by_test_id("pricing").inner_text())
        assert pricing["rounded_usd"] == CHAT_COST and pricing["exact_usd"] == "0.0000042"
        assert pricing["formula"] == ("((8 − 0 − 0 − 0) × 0.15 + 0 × 0.075 + 0 × 0.15 + "
                                      "0 × 0.15 + 5 × 0.6) / 1000000 × 1 = 0.0000042 → "
                                      "0.000004200 USD")
        assert chat.get_by_test_id("pricing").is_visible()
        # the pricing row is the API's, exactly
        api = httpx.get(f"{server.base_url}/v1/billing/usage", params={"type": "consume"},
                        headers={"Authorization": f"Bearer {secret}"}).json()["data"]
        assert pricing == next(r for r in api if r["product"] == "sandbox-chat")["pricing"]
        usage_shot = shot(page, "usage")

        # the balance went down by exactly the two costs
        nav(page, "Overview")
        page.wait_for_url("**/console")
        balance = page.get_by_test_id("balance").inner_text()
        assert balance == BALANCE_AFTER
        assert Decimal("5") - Decimal(balance) == Decimal(CHAT_COST) + Decimal(CALL_COST)
        assert page.get_by_test_id("period-cost").inner_text() == "0.002004200"
        overview_shot = shot(page, "overview")

        nav(page, "Statements")
        assert page.locator("text=Closing balance").count() == 1
        shot(page, "statements")

        # a phone-sized screen gets the same page, readable
        page.set_viewport_size({"width": 390, "height": 844})
        nav(page, "Overview")
        assert page.get_by_test_id("balance").is_visible()
        shot(page, "overview-phone")

        docs = ROOT / "docs" / "screenshots"
        docs.mkdir(parents=True, exist_ok=True)
        for path in (overview_shot, usage_shot):
            shutil.copyfile(path, docs / Path(path).name)
    finally:
        context.close()


def test_sign_out_ends_the_browser_session(server: Server, browser: Any) -> None:
    _, email = _operator_creates_customer(server)
    context = browser.new_context(base_url=server.base_url)
    page = context.new_page()
    try:
        page.goto("/login")
        page.get_by_label("Email or account name").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/console")
        cookies = {c["name"]: c for c in context.cookies()}
        assert cookies["tollway_session"]["httpOnly"] and cookies["tollway_session"][
            "sameSite"] == "Lax"
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url("**/login")
        page.goto("/console/keys")
        assert "/login" in page.url
    finally:
        context.close()
