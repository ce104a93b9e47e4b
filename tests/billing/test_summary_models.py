"""Summaries "by model" count every model, image models too (billed per image, so per call
like a data API), and "by endpoint" the data-API endpoints only — through the gateway, then
read back by the API, the CLI and the console's "Spend by model" chart, on SQLite and
PostgreSQL.

One account makes, through the gateway on the fake catalog (tests/fakes.py):
- a chat completion on ``gpt-test``: the fake reports 20 prompt + 5 completion tokens,
  (20 × 0.15 + 5 × 0.60) / 1e6 = 0.000006 USD = 6,000 nano-USD;
- 2 images 1792x1024 on ``image-test``: 2 × 0.08 = 0.16 USD = 160,000,000 nano-USD;
- one ``web-search`` call: 0.0015 USD = 1,500,000 nano-USD.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest

from fakes import Tollway
from tollway.billing import logins
from tollway.cli import main
from tollway.store.accounts import get_account
from webclient import login

PASSWORD = "summary models pw"
CHAT = {"product": "gpt-test", "requests": 1, "errors": 0, "input_tokens": 20,
        "cached_input_tokens": 0, "cache_write_tokens": 0, "cache_write_1h_tokens": 0,
        "output_tokens": 5, "reasoning_tokens": 0, "calls": 0, "cost_usd": "0.000006000"}
IMAGES = {"product": "image-test", "requests": 1, "errors": 0, "input_tokens": 0,
          "cached_input_tokens": 0, "cache_write_tokens": 0, "cache_write_1h_tokens": 0,
          "output_tokens": 0, "reasoning_tokens": 0, "calls": 2, "cost_usd": "0.160000000"}
SEARCH = {**IMAGES, "product": "web-search", "calls": 1, "cost_usd": "0.001500000"}
TOTAL_USD = "0.161506000"  # 6,000 + 160,000,000 + 1,500,000 nano-USD


@pytest.fixture
def spent(tw: Tollway) -> tuple[int, str]:
    """The account (with a console password) and its key, after the three requests."""
    account = tw.account()
    key = tw.key(account)
    client = tw.client(key)
    chat = client.chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert chat.headers["x-tollway-cost-usd"] == "0.000006000"
    images = client.images.with_raw_response.generate(model="image-test", prompt="a cat", n=2,
                                                      size="1792x1024")
    assert images.headers["x-tollway-cost-usd"] == "0.160000000"
    search = tw.http().get("/apis/v1/search/web", params={"q": "tollway"},
                           headers={"Authorization": f"Bearer {key}"})
    assert (search.status_code, search.headers["x-tollway-cost-usd"]) == (200, "0.001500000")
    password_hash = logins.hash_password(PASSWORD)
    with tw.db.write() as conn:
        logins.set_password_hash(conn, account, password_hash)
    return account, key


def summary(tw: Tollway, key: str, group_by: str) -> dict[str, Any]:
    response = tw.http().get("/v1/billing/summary", params={"group_by": group_by},
                             headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["totals"]["cost_usd"] == TOTAL_USD  # the totals always cover everything
    return body


def test_by_model_includes_image_models_and_by_endpoint_only_endpoints(
        tw: Tollway, spent: tuple[int, str]) -> None:
    _, key = spent
    assert summary(tw, key, "model")["data"] == [CHAT, IMAGES]
    assert summary(tw, key, "endpoint")["data"] == [SEARCH]
    assert summary(tw, key, "product")["data"] == [CHAT, IMAGES, SEARCH]
    assert summary(tw, key, "model,endpoint")["data"] == [CHAT, IMAGES, SEARCH]
    by_type = summary(tw, key, "model,billing_type")["data"]
    assert [(row["product"], row["billing_type"]) for row in by_type] == [
        ("gpt-test", "token"), ("image-test", "per_call")]


def test_the_cli_summary_by_model_includes_image_models(
        tw: Tollway, spent: tuple[int, str], capsys: pytest.CaptureFixture[str]) -> None:
    account, _ = spent
    for by, want in (("model", [CHAT, IMAGES]), ("endpoint", [SEARCH])):
        code = main(["summary", str(account), "--by", by, "--json",
                     "--database-url", tw.db.url])
        out, err = capsys.readouterr()
        assert (code, err) == (0, ""), err
        body = json.loads(out)
        assert body["data"] == want and body["totals"]["cost_usd"] == TOTAL_USD
    code = main(["summary", str(account), "--by", "model", "--database-url", tw.db.url])
    text = capsys.readouterr().out
    assert code == 0
    assert ("  product=image-test  requests 1, 2 calls, cost 0.160000000 USD"
            in text.splitlines()), text


def test_the_consoles_spend_by_model_chart_shows_image_models(
        tw: Tollway, spent: tuple[int, str]) -> None:
    account, _ = spent
    client = tw.http()
    with tw.db.read() as conn:
        name = get_account(conn, account).name
    assert login(client, name, PASSWORD).status_code == 303
    page = client.get("/console")
    assert page.status_code == 200
    figure = page.text.split("<figcaption>Spend by model (USD)</figcaption>")[1]
    figure = figure.split("</figure>")[0]
    rows = re.findall(r"<tr><td>(.*?)</td><td class=\"n\">(.*?)</td></tr>", figure)
    # largest spend first
    assert [(html.unescape(p), usd) for p, usd in rows] == [
        ("image-test", "0.160000000"), ("gpt-test", "0.000006000")]
    assert "image-test" in figure.split("<details>")[0]  # the chart itself, not only its table
