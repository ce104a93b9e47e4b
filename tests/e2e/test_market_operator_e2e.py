"""The marketplace and the operator's pages in headless Chromium against a real
``tollway serve`` with the sandbox catalog (examples/catalog.yaml).

- Anyone sees every catalog item on the marketplace with its billing type and price (written
  out by hand from the catalog file), and the ``vip`` group's prices after the group selector.
- The operator signs in with the admin token, creates a customer with a console password,
  tops the account up; the customer, signed in in a second browser context, sees the new
  balance on the console overview.

Screenshots of every page go to var/screenshots/; the marketplace one is also the README's
(docs/screenshots/marketplace.png). The server is shared with the console test, so this test
only previews a catalog change and never applies one.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from e2e_support import ROOT, Server, publish
from test_web_market import LIST_PRICES

PASSWORD = "e2e operator-made password"
LISTED = LIST_PRICES  # written out by hand from examples/catalog.yaml


def _rows(page: Any) -> dict[str, tuple[str, list[str]]]:
    """Each listed item's billing type and list price lines, as the browser shows them."""
    found = {}
    for row in page.locator("tr[data-item]").all():
        found[row.get_attribute("data-item")] = (
            row.locator(".badge").inner_text().strip(),
            row.locator("td.price").first.locator("li").all_inner_texts())
    return found


def test_the_marketplace_lists_every_catalog_item(server: Server, browser: Any,
                                                  shot: Any) -> None:
    context = browser.new_context(base_url=server.base_url,
                                  viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        page.goto("/")
        assert page.get_by_role("heading", name="Marketplace").is_visible()
        assert _rows(page) == LISTED
        assert page.locator('tr[data-item="stock-quote"] .endpoint').inner_text().split() == [
            "Stock", "quote", "GET", "/apis/v1/finance/quote/{symbol}"]
        path = shot(page, "marketplace")
        publish(path, "marketplace.png")

        # the group selector and the filters are a plain form
        page.get_by_label("Prices for group").select_option("vip")
        page.get_by_label("Billing type").select_option("token")
        page.get_by_role("button", name="Show").click()
        page.wait_for_url("**/?*group=vip*")
        assert sorted(_rows(page)) == ["sandbox-chat", "sandbox-claude", "sandbox-embed",
                                       "sandbox-reasoner"]
        chat = page.locator('tr[data-item="sandbox-chat"] td.group-price li')
        assert chat.all_inner_texts() == ["$0.105000 / 1M input tokens",
                                          "$0.420000 / 1M output tokens",
                                          "$0.052500 / 1M cached input tokens"]
        shot(page, "marketplace-vip")

        page.get_by_role("link", name="sandbox-chat").click()
        page.wait_for_url("**/market/sandbox-chat*")
        assert f"curl {server.base_url}/v1/chat/completions" in page.locator(
            "pre").first.inner_text()
        shot(page, "market-item-model")
        page.goto("/market/stock-quote")
        assert f'"{server.base_url}/apis/v1/finance/quote/$SYMBOL"' in page.locator(
            "pre").first.inner_text()
        shot(page, "market-item-endpoint")
        response = page.goto("/market/no-such-item")
        assert response is not None and response.status == 404
        assert "nothing in the marketplace is called" in page.inner_text("main")
    finally:
        context.close()


def test_operator_tops_up_and_the_customer_sees_it(server: Server, browser: Any,
                                                  shot: Any) -> None:
    name = f"e2e-op-{uuid.uuid4().hex[:8]}"
    email = f"{name}@example.com"
    operator = browser.new_context(base_url=server.base_url,
                                   viewport={"width": 1280, "height": 900})
    customer = browser.new_context(base_url=server.base_url,
                                   viewport={"width": 1280, "height": 900})
    try:
        admin = operator.new_page()
        admin.goto("/admin/accounts")
        assert "/admin/login?next=/admin/accounts" in admin.url
        admin.get_by_label("Admin token").fill(server.admin_token)
        admin.get_by_role("button", name="Sign in").click()
        admin.wait_for_url("**/admin/accounts")

        # create the customer, with a console login
        admin.get_by_label("Name").fill(name)
        admin.get_by_label("Email (optional: the console login)").fill(email)
        admin.get_by_label("Initial password (optional, at least 8 characters)").fill(
            PASSWORD)
        admin.get_by_role("button", name="Create account").click()
        admin.wait_for_url("**/admin/accounts/*?done=created")
        assert admin.locator('[data-field="balance"]').inner_text() == "0.000000000"

        # the customer signs in (another browser) and sees an empty wallet
        page = customer.new_page()
        page.goto("/login")
        page.get_by_label("Email or account name").fill(email)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/console")
        assert page.get_by_test_id("balance").inner_text() == "0.000000000"

        # the operator tops up; a typo first: the error is shown on the form
        admin.get_by_label("Amount (USD)", exact=True).fill("7.2.5")
        admin.get_by_role("button", name="Top up").click()
        assert "is not a number" in admin.get_by_role("alert").inner_text()
        admin.get_by_label("Amount (USD)", exact=True).fill("7.25")
        admin.get_by_label("Note (optional)").fill("e2e top-up")
        admin.get_by_role("button", name="Top up").click()
        admin.wait_for_url("**?done=topup")
        assert admin.get_by_role("status").inner_text() == "Top-up credited."
        assert admin.locator('[data-field="balance"]').inner_text() == "7.250000000"
        shot(admin, "admin-account")

        page.reload()
        assert page.get_by_test_id("balance").inner_text() == "7.250000000"
        shot(page, "console-after-topup")

        # the other operator pages
        admin.goto("/admin/accounts")
        assert admin.locator(f'tr[data-account="{name}"]').is_visible()
        shot(admin, "admin-accounts")
        admin.goto("/admin/catalog")
        assert admin.locator("tr[data-item]").count() == len(LISTED)
        shot(admin, "admin-catalog")
        catalog = (Path(ROOT) / "examples" / "catalog.yaml").read_text().replace(
            'price: {per_call: "0.002"}', 'price: {per_call: "0.0025"}')
        admin.get_by_label("or paste it here").fill(catalog)
        admin.get_by_role("button", name="Preview changes").click()
        admin.wait_for_url("**/admin/catalog/preview")
        assert admin.locator("#changes tbody tr").inner_text().split("\t") == [
            "web-search", "price", "$0.002000 / per call", "$0.002500 / per call"]
        shot(admin, "admin-catalog-preview")
        admin.goto("/admin/groups")
        shot(admin, "admin-groups")
        admin.goto("/admin/usage")
        shot(admin, "admin-usage")

        # the customer cannot reach operator pages
        page.goto("/admin/accounts")
        assert "/admin/login" in page.url
    finally:
        operator.close()
        customer.close()
