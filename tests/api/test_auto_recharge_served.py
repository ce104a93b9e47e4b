"""Auto-recharge as a running server does it by itself: the server's own deliverer (every
``TOLLWAY_NOTIFY_INTERVAL_SECONDS``) picks up the charge a request queued, charges the saved
card on ``localstripe`` and credits it, with no CLI or test hand in between."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from test_auto_recharge import ready_account, recharge_topups

from fake_stripe import SECRET_KEY, WEBHOOK_SECRET
from fakes import GATEWAY_ENV, USD, DataReply, FakeUpstream, Serving, Tollway

CENT = USD // 100


@pytest.fixture(scope="module")
def serving(localstripe: str) -> Serving:
    return Serving(env={
        **GATEWAY_ENV, "TOLLWAY_STRIPE_SECRET_KEY": SECRET_KEY,
        "TOLLWAY_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "TOLLWAY_STRIPE_API_BASE": localstripe,
        "TOLLWAY_PUBLIC_URL": "https://tollway.example", "TOLLWAY_TOPUP_MIN_USD": "5",
        "TOLLWAY_TOPUP_MAX_USD": "500", "TOLLWAY_NOTIFY_INTERVAL_SECONDS": "0.2"})


@pytest.fixture
def tw(served: Tollway) -> Iterator[Tollway]:
    served.begin_test()
    yield served
    served.close_clients()
    assert served.verify() == []


def test_the_server_charges_and_credits_by_itself(
        tw: Tollway, localstripe: str, upstream: FakeUpstream) -> None:
    account_id = ready_account(tw, localstripe, "5.01")
    upstream.data_replies["/bearer/papers/search"] = DataReply(200, b'{"papers": []}')
    answer = httpx.post(tw.url + "/apis/v1/scholar/search", json={"q": "x"},
                        headers={"Authorization": f"Bearer {tw.key(account_id)}"})
    assert answer.status_code == 200
    started = time.monotonic()
    while recharge_topups(tw, account_id) == [] and time.monotonic() - started < 15:
        time.sleep(0.05)
    # 5.01 - 0.02 = 4.99 < 5.00: charged 20.00 - 4.99 = 15.01, credited once
    assert recharge_topups(tw, account_id) == [1501 * CENT]
    assert tw.available(account_id) == 20 * USD
