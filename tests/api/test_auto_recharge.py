"""Auto-recharge on SQLite and PostgreSQL, with the official ``stripe`` library against
``localstripe`` (a stateful fake Stripe from PyPI: customers, payment methods, SetupIntents,
off-session PaymentIntents, and its own signed ``payment_intent.succeeded`` webhooks) on
127.0.0.1, started by this module.

What a customer relies on: a wallet that falls below the threshold gets its saved card
charged once, for what brings it to the target (however many concurrent requests cross it,
and however many deliverers run); never more than the monthly cap; a declined card is
notified and the setting paused after the configured number of failures; a charge is
credited once when both Stripe's answer and its webhook report it; the card is saved from
Stripe's event for the customer Tollway created, never from the client. The books verify
after each test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import stripe

from fake_stripe import SECRET_KEY, WEBHOOK_SECRET, FakeStripe, event, signature
from fakes import ADMIN_TOKEN, GATEWAY_ENV, USD, DataReply, FakeUpstream, Serving, Tollway
from tollway import clock
from tollway.billing import auto_recharge
from tollway.ledger import ledger, periods
from tollway.notify.deliverer import Deliverer
from tollway.store import notifications as notification_store
from tollway.store.tables import (
    accounts,
    entries,
    notification_events,
    payment_events,
    recharge_attempts,
)

CENT = USD // 100
VISA = "4242424242424242"
DECLINED_ON_CHARGE = "4000000000000341"  # attaches, then every charge is declined


@pytest.fixture(scope="module")
def serving(localstripe: str) -> Serving:
    return Serving(env={
        **GATEWAY_ENV, "TOLLWAY_STRIPE_SECRET_KEY": SECRET_KEY,
        "TOLLWAY_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "TOLLWAY_STRIPE_API_BASE": localstripe,
        "TOLLWAY_PUBLIC_URL": "https://tollway.example", "TOLLWAY_TOPUP_MIN_USD": "5",
        "TOLLWAY_TOPUP_MAX_USD": "500", "TOLLWAY_NOTIFY_INTERVAL_SECONDS": "0",
        "TOLLWAY_AUTO_RECHARGE_MAX_FAILURES": "3"})


@pytest.fixture(scope="module")
def hooked(served: Tollway, localstripe: str) -> Tollway:
    """localstripe delivers its events, signed, to this gateway's webhook."""
    answer = httpx.post(f"{localstripe}/_config/webhooks/tollway", data={
        "url": served.url + "/webhooks/stripe", "secret": WEBHOOK_SECRET})
    assert answer.status_code == 200, answer.text
    return served


@pytest.fixture
def tw(hooked: Tollway) -> Iterator[Tollway]:
    hooked.begin_test()
    yield hooked
    hooked.close_clients()
    assert hooked.verify() == []


# ----------------------------------------------------------------------------- helpers


def client(base: str) -> stripe.StripeClient:
    return stripe.StripeClient(SECRET_KEY, base_addresses={"api": base})


def writer(tw: Tollway) -> Callable[..., Any]:
    async def write(fn: Callable[[Any], Any], *, account_id: int | None = None) -> Any:
        return await asyncio.to_thread(tw.db.run_write, fn)
    return write


def deliverer(tw: Tollway, at_ms: Callable[[], int] = clock.now_ms) -> Deliverer:
    return Deliverer(writer(tw), clock_ms=at_ms)


def drain(tw: Tollway, *, workers: int = 1, at_ms: Callable[[], int] = clock.now_ms) -> int:
    """Deliver everything due with ``workers`` deliverers at once (as several workers do)."""
    async def run() -> int:
        each = [deliverer(tw, at_ms) for _ in range(workers)]
        try:
            return sum(await asyncio.gather(*(d.drain() for d in each)))
        finally:
            for d in each:
                await d.close()
    return asyncio.run(run())


def customer_of(tw: Tollway, account_id: int) -> str:
    return asyncio.run(auto_recharge.ensure_customer(writer(tw), account_id,
                                                     at_ms=clock.now_ms()))


def set_up_card(tw: Tollway, base: str, account_id: int, number: str = VISA) -> Any:
    """What the customer does on Stripe's set-up page (a SetupIntent confirmed with a card
    for Tollway's customer), then Stripe's signed ``setup_intent.succeeded``."""
    stripe_client = client(base)
    customer = customer_of(tw, account_id)
    method = stripe_client.v1.payment_methods.create(params={
        "type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2034,
                                 "cvc": "123"}})
    stripe_client.v1.payment_methods.attach(method.id, params={"customer": customer})
    intent = stripe_client.v1.setup_intents.create(params={"customer": customer})
    intent = stripe_client.v1.setup_intents.confirm(intent.id,
                                                    params={"payment_method": method.id})
    assert intent.status == "succeeded"
    return deliver(tw, event("setup_intent.succeeded", intent.to_dict()))


def deliver(tw: Tollway, payload: bytes) -> Any:
    return tw.http().post("/webhooks/stripe", content=payload, headers={
        "Stripe-Signature": signature(payload), "Content-Type": "application/json"})


def configure(tw: Tollway, account_id: int, **body: Any) -> Any:
    return tw.http().put("/v1/billing/auto_recharge", json={"enabled": True, **body},
                         headers={"Authorization": f"Bearer {tw.key(account_id)}"})


def spend(tw: Tollway, account_id: int, nano: int) -> None:
    """Charge the wallet the way a request does: a hold, then its settlement."""
    key = f"spend-{account_id}-{time.monotonic_ns()}"
    with tw.db.write() as conn:
        hold = ledger.place_hold(conn, account_id, nano, idempotency_key=key, ttl_ms=60_000,
                                 at_ms=clock.now_ms())
        ledger.settle_hold(conn, hold.id, nano, idempotency_key=key, at_ms=clock.now_ms())


def attempts(tw: Tollway, account_id: int) -> list[Any]:
    with tw.db.read() as conn:
        return list(conn.execute(sa.select(recharge_attempts).where(
            recharge_attempts.c.account_id == account_id).order_by(recharge_attempts.c.id)))


def events_of(tw: Tollway, account_id: int) -> list[str]:
    with tw.db.read() as conn:
        return list(conn.execute(sa.select(notification_events.c.type).where(
            notification_events.c.account_id == account_id)
            .order_by(notification_events.c.id)).scalars())


def recharge_topups(tw: Tollway, account_id: int) -> list[int]:
    with tw.db.read() as conn:
        return list(conn.execute(sa.select(entries.c.amount_nano).where(
            entries.c.account_id == account_id, entries.c.kind == "topup",
            entries.c.idempotency_key.like("topup:recharge:%")).order_by(entries.c.id))
            .scalars())


def wait_for(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def ready_account(tw: Tollway, base: str, usd: str, *, number: str = VISA,
                  threshold: str = "5.00", target: str = "20.00", cap: str = "100.00") -> int:
    account_id = tw.account(usd=usd)
    assert set_up_card(tw, base, account_id, number).json()["outcome"] == "card_saved"
    answer = configure(tw, account_id, threshold_usd=threshold, target_usd=target,
                       monthly_cap_usd=cap)
    assert answer.status_code == 200, answer.text
    return account_id


# ----------------------------------------------------------------------------- the setting


def test_the_setting_is_validated_and_shown(tw: Tollway) -> None:
    account_id = tw.account(usd="1")
    key = tw.key(account_id)
    headers = {"Authorization": f"Bearer {key}"}
    http = tw.http()
    bad = [
        {"threshold_usd": "5", "target_usd": "20", "monthly_cap_usd": "100"},  # no enabled
        {"enabled": True, "threshold_usd": 5, "target_usd": "20", "monthly_cap_usd": "100"},
        {"enabled": True, "threshold_usd": "5.001", "target_usd": "20",
         "monthly_cap_usd": "100"},
        {"enabled": True, "threshold_usd": "20", "target_usd": "20", "monthly_cap_usd": "100"},
        {"enabled": True, "threshold_usd": "5", "target_usd": "500.01",
         "monthly_cap_usd": "1000"},  # above the largest top-up
        {"enabled": True, "threshold_usd": "5", "target_usd": "9.99",
         "monthly_cap_usd": "100"},  # a charge could be under the smallest top-up
        {"enabled": True, "threshold_usd": "5", "target_usd": "20", "monthly_cap_usd": "4"},
        {"enabled": True, "threshold_usd": "-1", "target_usd": "20", "monthly_cap_usd": "100"},
        {"enabled": True, "threshold_usd": "5", "target_usd": "20"},  # no cap on first save
        {"enabled": True, "threshold_usd": "5", "target_usd": "20", "monthly_cap_usd": "100",
         "card": "pm_from_the_client"},
    ]
    for body in bad:
        answer = http.put("/v1/billing/auto_recharge", json=body, headers=headers)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["code"] == "invalid_request"
    assert http.get("/v1/billing/auto_recharge", headers=headers).json()["enabled"] is False
    answer = http.put("/v1/billing/auto_recharge", headers=headers, json={
        "enabled": True, "threshold_usd": "5", "target_usd": "20.50",
        "monthly_cap_usd": "100"})
    assert answer.status_code == 200, answer.text
    view = http.get("/v1/billing/auto_recharge", headers=headers).json()
    assert {k: view[k] for k in ("enabled", "threshold_usd", "target_usd", "monthly_cap_usd",
                                 "card_saved", "charged_this_month_usd",
                                 "left_this_month_usd", "paused")} == {
        "enabled": True, "threshold_usd": "5.000000000", "target_usd": "20.500000000",
        "monthly_cap_usd": "100.000000000", "card_saved": False,
        "charged_this_month_usd": "0.000000000", "left_this_month_usd": "100.000000000",
        "paused": False}
    # without a saved card the ledger does not watch the threshold at all
    with tw.db.read() as conn:
        assert conn.execute(sa.select(accounts.c.recharge_threshold_nano).where(
            accounts.c.id == account_id)).scalar_one() is None
    admin = http.get(f"/admin/v1/accounts/{account_id}/auto_recharge",
                     headers={"Authorization": "Bearer " + ADMIN_TOKEN})
    assert admin.status_code == 200 and admin.json()["target_usd"] == "20.500000000"


def test_the_card_is_saved_from_stripes_event_for_tollways_customer_only(
        tw: Tollway, localstripe: str) -> None:
    account_id = tw.account(usd="1")
    answer = set_up_card(tw, localstripe, account_id)
    assert (answer.status_code, answer.json()["outcome"]) == (200, "card_saved")
    # a set-up for a customer Tollway never created saves nothing anywhere
    stranger = client(localstripe).v1.customers.create(params={})
    intent = client(localstripe).v1.setup_intents.create(params={"customer": stranger.id})
    method = client(localstripe).v1.payment_methods.create(params={
        "type": "card", "card": {"number": VISA, "exp_month": 1, "exp_year": 2035,
                                 "cvc": "999"}})
    intent = client(localstripe).v1.setup_intents.confirm(
        intent.id, params={"payment_method": method.id})
    answer = deliver(tw, event("setup_intent.succeeded", intent.to_dict()))
    assert (answer.status_code, answer.json()["outcome"]) == (200, "unknown_customer")
    with tw.db.read() as conn:
        row = auto_recharge.store.get(conn, account_id)
        assert row.payment_method is not None and row.payment_method != method.id


# ----------------------------------------------------------------------------- the charge


def test_200_concurrent_requests_crossing_the_threshold_charge_once(
        tw: Tollway, localstripe: str, upstream: FakeUpstream) -> None:
    account_id = ready_account(tw, localstripe, "5.10")
    key = tw.key(account_id)
    upstream.data_replies["/bearer/papers/search"] = DataReply(200, b'{"papers": []}')

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=tw.url, timeout=60) as http:
            answers = await asyncio.gather(*(http.post(
                "/apis/v1/scholar/search", json={"q": str(i)},
                headers={"Authorization": f"Bearer {key}"}) for i in range(200)))
        return [a.status_code for a in answers]

    assert asyncio.run(burst()) == [200] * 200
    # 200 calls at 0.02 USD: 5.10 - 4.00; the crossing (below 5.00) queued exactly one charge
    assert tw.available(account_id) == 110 * CENT
    assert events_of(tw, account_id).count("auto_recharge.due") == 1
    drain(tw, workers=3)
    (attempt,) = attempts(tw, account_id)
    # target 20.00 - available 1.10 = 18.90, charged once and credited once
    assert (attempt.status, attempt.amount_nano) == ("succeeded", 1890 * CENT)
    assert tw.available(account_id) == 20 * USD
    intent = client(localstripe).v1.payment_intents.retrieve(attempt.payment_intent)
    assert (intent.status, intent.amount, intent.customer) == ("succeeded", 1890,
                                                              _customer(tw, account_id))
    # localstripe's own payment_intent.succeeded arrives about a second later: nothing more
    wait_for(lambda: _event_outcome(tw, attempt.payment_intent) is not None)
    assert _event_outcome(tw, attempt.payment_intent) == "already_paid"
    assert recharge_topups(tw, account_id) == [1890 * CENT]
    assert tw.available(account_id) == 20 * USD


def _customer(tw: Tollway, account_id: int) -> str:
    with tw.db.read() as conn:
        return str(auto_recharge.store.get(conn, account_id).stripe_customer)


def _event_outcome(tw: Tollway, payment_intent: str) -> str | None:
    """The outcome of the ``payment_intent.succeeded`` event handled for that intent."""
    with tw.db.read() as conn:
        rows = conn.execute(sa.select(payment_events.c.outcome, payment_events.c.event_id)
                            .where(payment_events.c.type == "payment_intent.succeeded")).all()
    sent = _localstripe_events(payment_intent)
    found = [r.outcome for r in rows if r.event_id in sent]
    return found[0] if found else None


def _localstripe_events(payment_intent: str) -> set[str]:
    """The ids of the ``payment_intent.succeeded`` events localstripe made for the intent."""
    from localstripe import resources  # noqa: PLC0415

    return {obj.id for obj in list(resources.store.values())
            if getattr(obj, "object", None) == "event"
            and getattr(obj, "type", None) == "payment_intent.succeeded"
            and obj.data["object"].get("id") == payment_intent}


def test_the_monthly_cap_is_respected_exactly(tw: Tollway, localstripe: str) -> None:
    account_id = ready_account(tw, localstripe, "5.00", cap="25.00")
    spend(tw, account_id, 1 * USD)  # 4.00: charge 16.00
    drain(tw)
    spend(tw, account_id, 1650 * CENT)  # 3.50: wants 16.50, 9.00 left of the cap
    drain(tw)
    assert tw.available(account_id) == 1250 * CENT
    spend(tw, account_id, 8 * USD)  # 4.50: the cap is used up, no charge
    drain(tw)
    assert tw.available(account_id) == 450 * CENT
    assert [(a.amount_nano, a.status) for a in attempts(tw, account_id)] == [
        (1600 * CENT, "succeeded"), (900 * CENT, "succeeded")]
    assert sum(recharge_topups(tw, account_id)) == 25 * USD
    charged = [client(localstripe).v1.payment_intents.retrieve(a.payment_intent).amount
               for a in attempts(tw, account_id)]
    assert charged == [1600, 900]
    view = tw.http().get("/v1/billing/auto_recharge",
                         headers={"Authorization": f"Bearer {tw.key(account_id)}"}).json()
    assert (view["charged_this_month_usd"], view["left_this_month_usd"]) == (
        "25.000000000", "0.000000000")
    # stopped by the cap, it waits for money to come in or the setting to be saved; in the
    # next month the cap starts again
    spend(tw, account_id, 10 * CENT)  # 4.40: nothing queued
    assert events_of(tw, account_id).count("auto_recharge.due") == 3
    assert configure(tw, account_id).status_code == 200
    _, month_end = periods.bounds(clock.now_ms(), "month")
    spend(tw, account_id, 40 * CENT)  # 4.00
    drain(tw, at_ms=lambda: month_end + 1000)
    assert attempts(tw, account_id)[-1].amount_nano == 1600 * CENT
    assert tw.available(account_id) == 20 * USD


def test_a_declined_card_is_notified_and_paused_after_n_failures(
        tw: Tollway, localstripe: str) -> None:
    account_id = ready_account(tw, localstripe, "5.00", number=DECLINED_ON_CHARGE)
    with tw.db.write() as conn:  # the account reads its notifications by email
        notification_store.save_settings(conn, account_id, {"email": "ops@example.com"},
                                         at_ms=clock.now_ms())
    for _ in range(3):
        spend(tw, account_id, 10 * CENT)
        drain(tw)
    assert [a.status for a in attempts(tw, account_id)] == ["failed"] * 3
    assert all("declined" in (a.error or "") for a in attempts(tw, account_id))
    assert [e for e in events_of(tw, account_id) if e.startswith("auto_recharge.")] == [
        "auto_recharge.due", "auto_recharge.failed", "auto_recharge.due",
        "auto_recharge.failed", "auto_recharge.due", "auto_recharge.paused"]
    view = tw.http().get("/v1/billing/auto_recharge",
                         headers={"Authorization": f"Bearer {tw.key(account_id)}"}).json()
    assert (view["paused"], view["consecutive_failures"], view["enabled"]) == (True, 3, True)
    spend(tw, account_id, 10 * CENT)  # paused: no more charges queued
    assert events_of(tw, account_id).count("auto_recharge.due") == 3
    assert drain(tw) == 0 or len(attempts(tw, account_id)) == 3
    assert len(attempts(tw, account_id)) == 3
    assert tw.available(account_id) == 460 * CENT
    # saving the setting again resumes it
    answer = configure(tw, account_id)
    assert (answer.json()["paused"], answer.json()["consecutive_failures"]) == (False, 0)


def test_credited_once_when_the_webhook_comes_first(tw: Tollway, localstripe: str) -> None:
    account_id = ready_account(tw, localstripe, "5.00")
    spend(tw, account_id, 2 * USD)  # 3.00: charge 17.00
    plan = tw.db.run_write(lambda conn: auto_recharge.begin(conn, account_id,
                                                            at_ms=clock.now_ms()))
    assert isinstance(plan, auto_recharge.Plan) and plan.amount_cents == 1700
    # a second due event while this charge is in flight is refused by the guarded row
    assert tw.db.run_write(lambda conn: auto_recharge.begin(
        conn, account_id, at_ms=clock.now_ms())) == "another recharge is in flight"
    charge = auto_recharge.stripe_checkout.charge_saved_card(
        attempt_id=plan.attempt_id, account_id=account_id, customer=plan.customer,
        payment_method=plan.payment_method, amount_cents=1700, currency="usd")
    assert charge.succeeded and charge.payment_intent
    intent = client(localstripe).v1.payment_intents.retrieve(charge.payment_intent)
    payload = event("payment_intent.succeeded", intent.to_dict())
    first = deliver(tw, payload).json()
    assert (first["outcome"], first["credited_usd"]) == ("credited", "17.000000000")
    assert deliver(tw, payload).json()["replay"] is True
    outcome = tw.db.run_write(lambda conn: auto_recharge.finish(conn, plan, charge,
                                                                at_ms=clock.now_ms()))
    assert outcome == "charged (already credited by Stripe's event)"
    wait_for(lambda: len(_localstripe_events(charge.payment_intent)) == 1)
    wait_for(lambda: _event_outcome(tw, charge.payment_intent) is not None)
    assert recharge_topups(tw, account_id) == [1700 * CENT]
    assert tw.available(account_id) == 20 * USD
    # an event for the attempt with another amount, or another account, credits nothing
    tampered = {**intent.to_dict(), "amount": 99_900}
    answer = deliver(tw, event("payment_intent.succeeded", tampered))
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "payment_mismatch")
    assert recharge_topups(tw, account_id) == [1700 * CENT]


def test_a_charge_booked_as_failed_that_stripe_did_make_is_credited_by_its_event(
        tw: Tollway, localstripe: str) -> None:
    """Stripe charged the card but Tollway booked the attempt as failed (an answer it
    misread): localstripe's own ``payment_intent.succeeded`` credits the attempt's amount,
    once, and the failure no longer counts."""
    account_id = ready_account(tw, localstripe, "5.00")
    spend(tw, account_id, 150 * CENT)  # 3.50: charge 16.50
    plan = tw.db.run_write(lambda conn: auto_recharge.begin(conn, account_id,
                                                            at_ms=clock.now_ms()))
    assert isinstance(plan, auto_recharge.Plan) and plan.amount_cents == 1650
    charge = auto_recharge.stripe_checkout.charge_saved_card(
        attempt_id=plan.attempt_id, account_id=account_id, customer=plan.customer,
        payment_method=plan.payment_method, amount_cents=1650, currency="usd")
    assert charge.succeeded and charge.payment_intent
    misread = auto_recharge.stripe_checkout.Charge(None, False, "the charge failed")
    outcome = tw.db.run_write(lambda conn: auto_recharge.finish(conn, plan, misread,
                                                                at_ms=clock.now_ms()))
    assert outcome.startswith("failed")
    assert tw.available(account_id) == 350 * CENT
    wait_for(lambda: _event_outcome(tw, charge.payment_intent) is not None)
    assert _event_outcome(tw, charge.payment_intent) == "credited"
    (attempt,) = attempts(tw, account_id)
    assert (attempt.status, attempt.payment_intent) == ("succeeded", charge.payment_intent)
    assert recharge_topups(tw, account_id) == [1650 * CENT]
    assert tw.available(account_id) == 20 * USD
    with tw.db.read() as conn:  # the failure it was booked as no longer counts
        row = auto_recharge.store.get(conn, account_id)
    assert (row.failures, row.in_flight_id) == (0, None)


def test_a_charge_whose_answer_was_lost_is_resumed_under_its_key_and_charged_once(
        tw: Tollway, localstripe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stripe charged the card but the answer never came back, through the library's own
    retries: the attempt keeps its slot (no second charge can start, however many debits
    cross the threshold), the delivery is retried, and the retry, under the same
    idempotency key, gets the first charge back: one charge of the card, credited once.
    (localstripe ignores idempotency keys; tests/fake_stripe.py keeps them as Stripe does.)"""
    account_id = ready_account(tw, localstripe, "5.00")
    spend(tw, account_id, 150 * CENT)  # 3.50: charge 16.50
    with FakeStripe() as fake:
        monkeypatch.setenv("TOLLWAY_STRIPE_API_BASE", fake.base)
        fake.lose_answers = 3  # the first call and the library's two retries
        with pytest.raises(auto_recharge.AnswerLost, match="no answer from Stripe"):
            asyncio.run(auto_recharge.run(writer(tw), account_id, clock_ms=clock.now_ms))
        (attempt,) = attempts(tw, account_id)
        assert attempt.status == "pending" and attempt.error.startswith("no answer")
        assert [i["amount"] for i in fake.intents.values()] == [1650]  # charged once
        assert tw.available(account_id) == 350 * CENT  # nothing credited yet
        spend(tw, account_id, 1 * USD)  # another debit below the threshold: still one slot
        assert tw.db.run_write(lambda conn: auto_recharge.store.start_attempt(
            conn, account_id, 1 * USD, currency="usd", month_start_ms=0,
            at_ms=clock.now_ms())) is None
        outcome = asyncio.run(auto_recharge.run(writer(tw), account_id,
                                                clock_ms=clock.now_ms))
        assert outcome == "charged and credited 16.500000000 USD"
        assert len(fake.intents) == 1  # the retry got the first charge back
        keys = {idem for kind, _, idem in fake.requests if kind == "payment_intent"}
        assert keys == {f"tollway-recharge-{attempt.id}"}
    (attempt,) = attempts(tw, account_id)
    assert (attempt.status, attempt.error) == ("succeeded", None)
    assert recharge_topups(tw, account_id) == [1650 * CENT]
    assert tw.available(account_id) == 1900 * CENT  # 3.50 - 1.00 + 16.50
    with tw.db.read() as conn:  # a lost answer is not the card's failure
        row = auto_recharge.store.get(conn, account_id)
    assert (row.failures, row.in_flight_id) == (0, None)


def test_a_charge_whose_process_died_is_resumed_under_its_key_after_a_while(
        tw: Tollway, localstripe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    account_id = ready_account(tw, localstripe, "5.00")
    spend(tw, account_id, 1 * USD)  # 4.00
    now = clock.now_ms()
    died = tw.db.run_write(lambda conn: auto_recharge.begin(conn, account_id, at_ms=now))
    assert isinstance(died, auto_recharge.Plan)  # ... and its process died here
    soon = now + auto_recharge.STALE_MS - 1
    assert tw.db.run_write(lambda conn: auto_recharge.begin(
        conn, account_id, at_ms=soon)) == "another recharge is in flight"
    later = now + auto_recharge.STALE_MS + 1
    plan = tw.db.run_write(lambda conn: auto_recharge.begin(conn, account_id, at_ms=later))
    assert plan == died  # the same attempt, amount and card: the same idempotency key
    with FakeStripe() as fake:
        monkeypatch.setenv("TOLLWAY_STRIPE_API_BASE", fake.base)
        for _ in range(2):  # whether or not the dead process's call reached Stripe
            charge = auto_recharge.stripe_checkout.charge_saved_card(
                attempt_id=plan.attempt_id, account_id=account_id, customer=plan.customer,
                payment_method=plan.payment_method, amount_cents=plan.amount_cents,
                currency="usd")
        assert [i["amount"] for i in fake.intents.values()] == [1600]
    tw.db.run_write(lambda conn: auto_recharge.finish(conn, plan, charge, at_ms=later))
    (attempt,) = attempts(tw, account_id)
    assert (attempt.status, attempt.amount_nano) == ("succeeded", 1600 * CENT)
    assert recharge_topups(tw, account_id) == [1600 * CENT]
    with tw.db.read() as conn:
        assert auto_recharge.store.get(conn, account_id).failures == 0


# ----------------------------------------------------------------------------- console, CLI


def test_the_console_form_saves_the_setting_and_shows_the_charges(
        tw: Tollway, localstripe: str) -> None:
    from tollway.billing import logins  # noqa: PLC0415
    from webclient import csrf, login  # noqa: PLC0415

    account_id = ready_account(tw, localstripe, "5.00")
    with tw.db.write() as conn:
        logins.set_password_hash(conn, account_id, logins.hash_password("correct horse"))
        name = conn.execute(sa.select(accounts.c.name).where(accounts.c.id == account_id)
                            ).scalar_one()
    http = tw.http()
    assert login(http, name, "correct horse").status_code == 303
    token = csrf(http, "/console/billing")
    refused = http.post("/console/billing/auto_recharge", data={
        "csrf_token": token, "enabled": "on", "threshold_usd": "30", "target_usd": "20",
        "monthly_cap_usd": "100"})
    assert refused.status_code == 400
    assert "target_usd must be greater than threshold_usd" in refused.text
    saved = http.post("/console/billing/auto_recharge", data={
        "csrf_token": token, "enabled": "on", "threshold_usd": "6", "target_usd": "30",
        "monthly_cap_usd": "50"}, follow_redirects=False)
    assert saved.status_code == 303, saved.text
    spend(tw, account_id, 1 * USD)  # 4.00 < 6.00: charge 26.00
    drain(tw)
    page = http.get("/console/billing").text
    assert "bring it to $30.00" in page and "$26.00 charged this month" in page
    assert tw.available(account_id) == 30 * USD


def test_the_cli_shows_sets_and_disables(tw: Tollway, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    from tollway.cli import main  # noqa: PLC0415

    account_id = tw.account(usd="1")
    url = ["--database-url", tw.db.url]
    assert main(["auto-recharge", "set", str(account_id), "--threshold", "5", "--target", "25",
                 "--monthly-cap", "60", *url]) == 0
    assert "below 5.000000000 USD, charge to 25.000000000 USD" in capsys.readouterr().out
    assert main(["auto-recharge", "set", str(account_id), "--target", "4", *url]) != 0
    assert "target_usd must be greater" in capsys.readouterr().err
    assert main(["auto-recharge", "disable", str(account_id), *url]) == 0
    assert "auto-recharge: off" in capsys.readouterr().out
    assert main(["auto-recharge", "show", str(account_id), "--json", *url]) == 0
    shown = capsys.readouterr().out
    assert '"enabled": false' in shown and '"target_usd": "25.000000000"' in shown


def test_migration_0013_matches_the_tables_and_downgrades(db: Any) -> None:
    from alembic import command  # noqa: PLC0415
    from alembic.autogenerate import compare_metadata  # noqa: PLC0415
    from alembic.runtime.migration import MigrationContext  # noqa: PLC0415

    from tollway.store.migrate import (  # noqa: PLC0415
        alembic_config,
        current_revision,
        head_revision,
        upgrade,
    )
    from tollway.store.tables import metadata  # noqa: PLC0415

    def drift() -> list[object]:
        with db.read() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        return [d for d in diffs if "recharge" in repr(d)]

    assert current_revision(db) == head_revision() and drift() == []
    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0012_promo_credit")
    with db.read() as conn:
        assert not sa.inspect(conn).has_table("auto_recharge")
        assert not sa.inspect(conn).has_table("recharge_attempts")
        assert "recharge_armed" not in {c["name"] for c in
                                        sa.inspect(conn).get_columns("accounts")}
    upgrade(db)
    assert current_revision(db) == head_revision() and drift() == []


def test_saving_a_card_starts_a_setup_session_for_tollways_customer(
        tw: Tollway, monkeypatch: pytest.MonkeyPatch) -> None:
    account_id = tw.account(usd="1")
    headers = {"Authorization": f"Bearer {tw.key(account_id)}"}
    with FakeStripe() as fake:  # localstripe has no Checkout Sessions
        monkeypatch.setenv("TOLLWAY_STRIPE_API_BASE", fake.base)
        first = tw.http().post("/v1/billing/auto_recharge/card", headers=headers)
        second = tw.http().post("/v1/billing/auto_recharge/card", headers=headers)
    assert (first.status_code, second.status_code) == (201, 201), first.text
    sessions = [fake.sessions[a.json()["id"]] for a in (first, second)]
    assert first.json()["url"] == f"{fake.base}/pay/{first.json()['id']}"
    # one customer, made once for the account, named by both set-up sessions
    assert len(set(fake.customers.values())) == 1
    customer = next(iter(fake.customers.values()))
    assert [(s["mode"], s["customer"]) for s in sessions] == [("setup", customer)] * 2
    assert sessions[0]["success_url"] == "https://tollway.example/console/billing?card=saved"
    assert _customer(tw, account_id) == customer
    # the card itself comes only from Stripe's event: nothing is saved yet
    view = tw.http().get("/v1/billing/auto_recharge", headers=headers).json()
    assert view["card_saved"] is False


def test_a_top_up_made_to_save_the_card_saves_it(tw: Tollway, localstripe: str) -> None:
    """A PaymentIntent with ``setup_future_usage: off_session`` for Tollway's customer (a
    top-up that also saved the card) saves its payment method; without it, nothing."""
    account_id = tw.account(usd="1")
    customer = customer_of(tw, account_id)
    intent = {"id": "pi_test_topup_saves", "object": "payment_intent", "amount": 2000,
              "currency": "usd", "customer": customer, "payment_method": "pm_test_saved",
              "status": "succeeded", "metadata": {}}
    answer = deliver(tw, event("payment_intent.succeeded", intent))
    assert answer.json()["outcome"] == "unknown_payment"
    answer = deliver(tw, event("payment_intent.succeeded",
                               {**intent, "setup_future_usage": "off_session"}))
    assert answer.json()["outcome"] == "card_saved"
    with tw.db.read() as conn:
        assert auto_recharge.store.get(conn, account_id).payment_method == "pm_test_saved"
    assert recharge_topups(tw, account_id) == []
