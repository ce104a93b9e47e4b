"""End to end in headless Chromium: a customer adds funds by card.

The gateway runs in-process on SQLite with card top-ups pointed at the fake Stripe Checkout
API (``fake_stripe``). The customer signs in, opens Billing, picks the $20.00 preset, is sent
to the fake's payment page, pays (the fake delivers the signed ``checkout.session.completed``
webhook, then sends the browser back), sees the payment received and the new balance, and
opens the receipt. 5.00 of earlier credit + 20.00 = 25.000000000 available.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fake_stripe import FakeStripe, stripe_env
from fakes import ADMIN_TOKEN, GATEWAY_ENV, Tollway, running_tollway
from tollway.store.db import Database
from tollway.store.migrate import upgrade

PASSWORD = "e2e billing password"


@pytest.fixture(scope="module")
def billing_server(tmp_path_factory: pytest.TempPathFactory, stripe_fake: FakeStripe,
                   ) -> Iterator[Tollway]:
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('billing') / 'tollway.db'}")
    upgrade(db)
    env = {**GATEWAY_ENV, **stripe_env(stripe_fake), "TOLLWAY_PUBLIC_URL": "",
           "TOLLWAY_RECEIPT_BUSINESS_NAME": "Example Gateway GmbH",
           "TOLLWAY_RECEIPT_BUSINESS_ADDRESS": "1 Main St\\nVAT DE123"}
    with running_tollway(db, "providers: {}\n", env=env) as tollway:
        import os

        os.environ["TOLLWAY_PUBLIC_URL"] = tollway.url  # read per request
        stripe_fake.webhook_url = tollway.url + "/webhooks/stripe"
        try:
            yield tollway
        finally:
            os.environ.pop("TOLLWAY_PUBLIC_URL", None)
    db.dispose()


def test_a_customer_adds_funds_by_card_and_gets_a_receipt(
        billing_server: Tollway, browser: Any, shot: Any) -> None:
    base = billing_server.url
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    name = f"payer-{uuid.uuid4().hex[:8]}"
    email = f"{name}@example.com"
    created = httpx.post(f"{base}/admin/v1/accounts", headers=admin,
                         json={"name": name, "email": email, "password": PASSWORD})
    assert created.status_code == 201, created.text
    assert httpx.post(f"{base}/admin/v1/accounts/{name}/topups", headers=admin,
                      json={"amount_usd": "5.00", "note": "e2e"}).status_code == 201
    context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto("/console/billing")
        page.get_by_label("Email or account name").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/console/billing")
        assert page.get_by_test_id("available").inner_text() == "5.000000000"
        shot(page, "billing")

        page.get_by_role("button", name="$20.00").click()  # off to (fake) Stripe Checkout
        page.wait_for_url("**/pay/cs_test_*")
        assert page.get_by_role("heading").inner_text() == "Pay $20.00"
        page.get_by_role("button", name="Pay").click()  # the webhook, then back to Tollway

        page.wait_for_url("**/console/billing/return?order=*")
        assert page.get_by_test_id("payment-status").inner_text() == (
            "Payment received: 20.00 USD was added to your balance.")
        assert page.get_by_test_id("available").inner_text() == "25.000000000"
        shot(page, "billing-return")

        page.get_by_test_id("receipt-link").click()
        page.wait_for_url("**/console/billing/receipts/*")
        assert page.get_by_test_id("receipt-total").inner_text() == "20.00"
        assert page.get_by_test_id("business").inner_text().splitlines() == [
            "Example Gateway GmbH", "1 Main St", "VAT DE123"]
        shot(page, "receipt")

        page.goto("/console/billing")
        history = page.get_by_test_id("payments").inner_text()
        assert "paid" in history and "20.00" in history
    finally:
        context.close()
    assert billing_server.verify() == []
