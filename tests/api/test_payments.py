"""Card top-ups through Stripe Checkout, on SQLite and PostgreSQL: the official ``stripe``
library talks to a fake Checkout API on 127.0.0.1 (``fake_stripe``), webhooks carry real
signatures computed with the endpoint secret, and the books are verified after each test.

What a customer relies on: a paid session credits its order's own amount exactly once (twice
delivered, delivered concurrently, or confirmed by a second event type); a forged, stale or
tampered delivery, an unknown session, a session whose amount, currency, order or account
disagree with the order row credit nothing; refunds and disputes take back at most what the
wallet has left and write the rest off.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa

from fake_stripe import FakeStripe, event, signature, stripe_env
from fakes import (
    GATEWAY_ENV,
    USD,
    FakeUpstream,
    Tollway,
    error_of,
    fake_catalog,
    fresh_database,
    running_tollway,
)
from tollway import clock
from tollway.billing import payments
from tollway.ledger import ledger
from tollway.store.tables import entries, payment_events, payment_orders, postings, wallet_days

CENT = USD // 100


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request: pytest.FixtureRequest, upstream: FakeUpstream,
           stripe_fake: FakeStripe) -> Iterator[Tollway]:
    env = {**GATEWAY_ENV, **stripe_env(stripe_fake), "TOLLWAY_PUBLIC_URL": "https://tollway.example",
           "TOLLWAY_TOPUP_MIN_USD": "5", "TOLLWAY_TOPUP_MAX_USD": "500",
           "TOLLWAY_TOPUP_PRESETS_USD": "10,20,50",
           "TOLLWAY_RECEIPT_BUSINESS_NAME": "Acme Gateways GmbH",
           "TOLLWAY_RECEIPT_BUSINESS_ADDRESS": "Hauptstraße 1\\n10115 Berlin\\nVAT DE123456789"}
    with fresh_database(request) as db, running_tollway(db, fake_catalog(upstream), upstream,
                                                        env=env) as tollway:
        stripe_fake.webhook_url = tollway.url + "/webhooks/stripe"
        yield tollway


# ----------------------------------------------------------------------------- helpers


def checkout(tw: Tollway, key: str, amount: Any) -> Any:
    return tw.http().post("/v1/billing/checkout", json={"amount_usd": amount},
                          headers={"Authorization": f"Bearer {key}"})


def paid_order(tw: Tollway, stripe_fake: FakeStripe, account_id: int,
               amount: str = "20.00") -> tuple[int, str]:
    """(order id, session id) of a checkout the customer started and Stripe has marked paid
    (its webhook not delivered yet)."""
    answer = checkout(tw, tw.key(account_id), amount)
    assert answer.status_code == 201, answer.text
    return answer.json()["order_id"], answer.json()["id"]


def deliver(tw: Tollway, payload: bytes, sig: str | None = "sign") -> Any:
    headers = {"Content-Type": "application/json"}
    if sig == "sign":
        headers["Stripe-Signature"] = signature(payload)
    elif sig is not None:
        headers["Stripe-Signature"] = sig
    return tw.http().post("/webhooks/stripe", content=payload, headers=headers)


def session_event(stripe_fake: FakeStripe, sid: str, type_: str = "checkout.session.completed",
                  event_id: str | None = None, **changes: Any) -> bytes:
    stripe_fake.complete(sid)
    session = {k: v for k, v in stripe_fake.sessions[sid].items() if not k.startswith("_")}
    session.update(changes)
    return event(type_, session, event_id=event_id)


def order(tw: Tollway, order_id: int) -> Any:
    with tw.db.read() as conn:
        return conn.execute(sa.select(payment_orders)
                            .where(payment_orders.c.id == order_id)).one()


def topup_entries(tw: Tollway, account_id: int) -> int:
    with tw.db.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(entries).where(
            entries.c.account_id == account_id, entries.c.kind == "topup")).scalar_one())


def spend(tw: Tollway, account_id: int, nano: int) -> None:
    """Charge the wallet ``nano`` the way a request does: a hold, then its settlement."""
    with tw.db.write() as conn:
        hold = ledger.place_hold(conn, account_id, nano, idempotency_key=f"spend-{account_id}",
                                 ttl_ms=60_000, at_ms=clock.now_ms())
        ledger.settle_hold(conn, hold.id, nano, idempotency_key=f"spend-{account_id}",
                           at_ms=clock.now_ms())


# ----------------------------------------------------------------------------- checkout


def test_checkout_writes_the_order_and_creates_its_session(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd=None)
    answer = checkout(tw, tw.key(account_id), "20.00")
    assert answer.status_code == 201, answer.text
    body = answer.json()
    sid = body["id"]
    assert sid.startswith("cs_test_") and body["url"] == f"{stripe_fake.base}/pay/{sid}"
    assert body["amount_usd"] == "20.000000000" and body["currency"] == "usd"
    row = order(tw, body["order_id"])
    assert (row.account_id, row.amount_nano, row.currency, row.status, row.session_id) == (
        account_id, 20 * USD, "usd", "open", sid)
    kind, params, idem = stripe_fake.requests[-1]
    assert kind == "create" and idem == f"tollway-order-{row.id}"
    assert params["mode"] == "payment"
    assert params["line_items"]["0"]["price_data"]["unit_amount"] == "2000"
    assert params["line_items"]["0"]["price_data"]["currency"] == "usd"
    assert params["client_reference_id"] == f"tollway-order-{row.id}"
    assert params["metadata"] == {"order_id": str(row.id), "account_id": str(account_id)}
    assert params["success_url"] == ("https://tollway.example/console/billing/return?order="
                                     f"{row.id}&session_id={{CHECKOUT_SESSION_ID}}")
    assert params["cancel_url"] == (f"https://tollway.example/console/billing/return?order="
                                    f"{row.id}&canceled=1")
    listed = tw.http().get("/v1/billing/payments",
                           headers={"Authorization": f"Bearer {tw.key(account_id)}"}).json()
    assert [(o["id"], o["status"], o["amount_usd"]) for o in listed["data"]] == [
        (row.id, "open", "20.000000000")]
    assert tw.available(account_id) == 0  # nothing is credited before payment


@pytest.mark.parametrize("amount", ["4.99", "500.01", "20.001", "0", "-10", "abc", "", None,
                                    True, [20], "1e2", "NaN"])
def test_amounts_outside_the_bounds_or_finer_than_a_cent_are_refused(
        tw: Tollway, amount: Any) -> None:
    account_id = tw.account(usd=None)
    answer = checkout(tw, tw.key(account_id), amount)
    assert answer.status_code == 400, (amount, answer.text)
    assert error_of(answer)["code"] == "invalid_request"
    with tw.db.read() as conn:
        assert conn.execute(sa.select(payment_orders).where(
            payment_orders.c.account_id == account_id)).first() is None


@pytest.mark.parametrize("amount,nano", [("5", 5 * USD), ("500.00", 500 * USD),
                                         ("12.34", 1234 * CENT), (7, 7 * USD)])
def test_any_amount_within_the_bounds_with_two_decimals_is_accepted(
        tw: Tollway, amount: Any, nano: int) -> None:
    account_id = tw.account(usd=None)
    answer = checkout(tw, tw.key(account_id), amount)
    assert answer.status_code == 201, answer.text
    assert order(tw, answer.json()["order_id"]).amount_nano == nano


def test_a_provider_failure_is_502_and_closes_the_order(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd=None)
    stripe_fake.fail_next = True
    answer = checkout(tw, tw.key(account_id), "10")
    assert answer.status_code == 502 and error_of(answer)["code"] == "payment_provider_error"
    with tw.db.read() as conn:
        statuses = conn.execute(sa.select(payment_orders.c.status).where(
            payment_orders.c.account_id == account_id)).scalars().all()
    assert statuses == ["failed"]


def test_without_stripe_settings_checkout_is_503(tw: Tollway,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    account_id = tw.account(usd=None)
    monkeypatch.setenv("TOLLWAY_STRIPE_SECRET_KEY", "")
    answer = checkout(tw, tw.key(account_id), "10")
    assert answer.status_code == 503 and error_of(answer)["code"] == "payments_unavailable"


def test_a_key_starts_and_lists_only_its_own_accounts_orders(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    alice, bob = tw.account(usd=None), tw.account(usd=None)
    bobs_order, _ = paid_order(tw, stripe_fake, bob, "10")
    answer = tw.http().post(f"/v1/billing/checkout?account={bob}",
                            json={"amount_usd": "10", "account_id": bob},
                            headers={"Authorization": f"Bearer {tw.key(alice)}"})
    assert order(tw, answer.json()["order_id"]).account_id == alice
    listed = tw.http().get(f"/v1/billing/payments?account={bob}", headers={
        "Authorization": f"Bearer {tw.key(alice)}"}).json()["data"]
    assert [o["id"] for o in listed] == [answer.json()["order_id"]]
    assert bobs_order not in [o["id"] for o in listed]


def test_checkout_needs_a_key(tw: Tollway) -> None:
    answer = tw.http().post("/v1/billing/checkout", json={"amount_usd": "10"})
    assert answer.status_code == 401


# ----------------------------------------------------------------------------- crediting


def test_a_paid_session_credits_the_orders_amount_exactly_once(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd="1")
    order_id, sid = paid_order(tw, stripe_fake, account_id, "20.00")
    payload = session_event(stripe_fake, sid)
    first = deliver(tw, payload)
    assert first.status_code == 200, first.text
    assert first.json() == {"received": True, "outcome": "credited", "replay": False,
                            "order_id": order_id, "credited_usd": "20.000000000"}
    assert tw.available(account_id) == 21 * USD
    again = deliver(tw, payload)  # Stripe redelivers the same event
    assert again.json()["outcome"] == "credited" and again.json()["replay"] is True
    assert again.json()["credited_usd"] == "0.000000000"
    other = deliver(tw, session_event(  # a second event type for the same payment
        stripe_fake, sid, "checkout.session.async_payment_succeeded"))
    assert other.json()["outcome"] == "already_paid"
    assert tw.available(account_id) == 21 * USD
    assert topup_entries(tw, account_id) == 2  # the seed and this order
    row = order(tw, order_id)
    assert row.status == "paid" and row.payment_intent == f"pi_test_{sid[8:]}"
    assert row.entry_id is not None
    assert tw.verify() == []


def test_concurrent_duplicate_deliveries_credit_once(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd=None)
    _, sid = paid_order(tw, stripe_fake, account_id, "50")
    same = session_event(stripe_fake, sid)
    other = session_event(stripe_fake, sid, "checkout.session.async_payment_succeeded")
    payloads = [same] * 6 + [other] * 6
    start = threading.Barrier(len(payloads))

    def send(payload: bytes) -> str:
        start.wait()
        return str(deliver(tw, payload).json()["outcome"])

    with ThreadPoolExecutor(len(payloads)) as pool:
        outcomes = list(pool.map(send, payloads))
    assert outcomes.count("credited") in (1, 6)  # the winner, and replays of its event
    assert "credited" in outcomes and set(outcomes) <= {"credited", "already_paid"}
    assert tw.available(account_id) == 50 * USD
    assert topup_entries(tw, account_id) == 1
    assert tw.verify() == []


def test_two_transactions_racing_on_two_connections_credit_once(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    """Two workers' transactions handle deliveries of one payment at the same moment: the
    second waits for the first's row and index entry, then sees it committed."""
    account_id = tw.account(usd=None)
    for same_event in (True, False):
        _, sid = paid_order(tw, stripe_fake, account_id, "30")
        first = json.loads(session_event(stripe_fake, sid))
        second = first if same_event else json.loads(session_event(
            stripe_fake, sid, "checkout.session.async_payment_succeeded"))
        results: list[Any] = []
        holding = tw.db.write()
        conn = holding.__enter__()
        results.append(payments.handle_event(conn, first, at_ms=clock.now_ms()))

        def racer(ev: dict[str, Any] = second, results: list[Any] = results) -> None:
            with tw.db.write() as other:
                results.append(payments.handle_event(other, ev, at_ms=clock.now_ms()))

        thread = threading.Thread(target=racer)
        thread.start()
        thread.join(0.5)  # it cannot finish while the first transaction is open
        assert len(results) == 1 and results[0].outcome == "credited"
        holding.__exit__(None, None, None)
        thread.join(30)
        assert len(results) == 2 and results[1].credited_nano == 0
        assert (results[1].replay, results[1].outcome) == (
            (True, "credited") if same_event else (False, "already_paid"))
    assert tw.available(account_id) == 60 * USD
    assert topup_entries(tw, account_id) == 2
    assert tw.verify() == []


@pytest.mark.parametrize("how", ["wrong secret", "stale", "missing", "tampered", "garbage"])
def test_forged_or_stale_signatures_are_refused_and_credit_nothing(
        tw: Tollway, stripe_fake: FakeStripe, how: str) -> None:
    account_id = tw.account(usd=None)
    order_id, sid = paid_order(tw, stripe_fake, account_id, "20")
    payload = session_event(stripe_fake, sid)
    sig: str | None = {"wrong secret": signature(payload, "whsec_attacker"),
                       "stale": signature(payload, at=int(time.time()) - 301),
                       "missing": None,
                       "tampered": signature(payload),
                       "garbage": "t=1,v1=00"}[how]
    if how == "tampered":  # signed for 20.00, then the amount raised
        payload = payload.replace(b'"amount_total": 2000', b'"amount_total": 200000')
        assert b"200000" in payload
    answer = deliver(tw, payload, sig)
    assert answer.status_code == 400 and error_of(answer)["code"] == "invalid_signature"
    assert tw.available(account_id) == 0 and order(tw, order_id).status == "open"
    with tw.db.read() as conn:
        assert conn.execute(sa.select(payment_events).where(
            payment_events.c.order_id == order_id)).first() is None


def test_an_unknown_session_is_ignored(tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd=None)
    order_id, sid = paid_order(tw, stripe_fake, account_id, "20")
    # a session made elsewhere (say, by hand in the dashboard) that points at our order
    payload = session_event(stripe_fake, sid, id="cs_test_not_ours")
    answer = deliver(tw, payload)
    assert answer.status_code == 200 and answer.json()["outcome"] == "unknown_session"
    assert tw.available(account_id) == 0 and order(tw, order_id).status == "open"


@pytest.mark.parametrize("changes,outcome", [
    ({"amount_total": 1999}, "amount_mismatch"),
    ({"amount_total": 200000}, "amount_mismatch"),
    ({"currency": "eur"}, "amount_mismatch"),
    ({"client_reference_id": "tollway-order-1"}, "account_mismatch"),
    ({"metadata": {}}, "account_mismatch"),
])
def test_a_session_that_disagrees_with_its_order_credits_nothing(
        tw: Tollway, stripe_fake: FakeStripe, changes: dict[str, Any], outcome: str) -> None:
    account_id = tw.account(usd=None)
    order_id, sid = paid_order(tw, stripe_fake, account_id, "20")
    answer = deliver(tw, session_event(stripe_fake, sid, **changes))
    assert answer.status_code == 400 and error_of(answer)["code"] == "payment_mismatch"
    assert outcome in error_of(answer)["message"]
    assert tw.available(account_id) == 0 and order(tw, order_id).status == "open"
    assert tw.verify() == []


def test_another_accounts_session_credits_nobody(tw: Tollway, stripe_fake: FakeStripe) -> None:
    """The attacker pays their own small order, then claims the session is for the victim's
    account (or the victim's larger order): the order row decides, and it disagrees."""
    attacker, victim = tw.account(usd=None), tw.account(usd=None)
    _, attacker_sid = paid_order(tw, stripe_fake, attacker, "5")
    victim_order, _ = paid_order(tw, stripe_fake, victim, "500")
    for changes in ({"metadata": {"account_id": str(victim), "order_id": str(victim_order)}},
                    {"client_reference_id": f"tollway-order-{victim_order}"}):
        answer = deliver(tw, session_event(stripe_fake, attacker_sid, **changes))
        assert answer.status_code == 400
        assert "account_mismatch" in error_of(answer)["message"]
    assert tw.available(attacker) == 0 and tw.available(victim) == 0
    # the genuine event still credits the attacker's own 5.00 (and nothing more)
    assert deliver(tw, session_event(stripe_fake, attacker_sid)).json()["outcome"] == "credited"
    assert (tw.available(attacker), tw.available(victim)) == (5 * USD, 0)


def test_unpaid_and_expired_sessions_credit_nothing(tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd=None)
    order_id, sid = paid_order(tw, stripe_fake, account_id, "20")
    pending = deliver(tw, session_event(stripe_fake, sid, payment_status="unpaid"))
    assert pending.json()["outcome"] == "awaiting_payment" and order(tw, order_id).status == "open"
    expired = deliver(tw, session_event(stripe_fake, sid, "checkout.session.expired",
                                        payment_status="unpaid"))
    assert expired.json()["outcome"] == "expired" and order(tw, order_id).status == "expired"
    late = deliver(tw, session_event(stripe_fake, sid))
    assert late.json()["outcome"] == "already_paid"
    assert tw.available(account_id) == 0


def test_other_event_types_are_acknowledged_and_ignored(tw: Tollway) -> None:
    answer = deliver(tw, event("customer.created", {"id": "cus_1"}))
    assert answer.status_code == 200 and answer.json() == {"received": True,
                                                           "outcome": "ignored"}


# ----------------------------------------------------------------------------- refunds


def charge(sid: str, *, refunded_cents: int = 0, currency: str = "usd") -> dict[str, Any]:
    return {"id": f"ch_{sid}", "object": "charge", "payment_intent": f"pi_test_{sid[8:]}",
            "amount": 2000, "amount_refunded": refunded_cents, "currency": currency,
            "refunded": refunded_cents == 2000}


def credited_order(tw: Tollway, stripe_fake: FakeStripe, account_id: int) -> tuple[int, str]:
    order_id, sid = paid_order(tw, stripe_fake, account_id, "20")
    assert deliver(tw, session_event(stripe_fake, sid)).json()["outcome"] == "credited"
    return order_id, sid


def test_a_refund_after_partial_spend_takes_the_rest_and_writes_off_the_spent_part(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd=None)
    order_id, sid = credited_order(tw, stripe_fake, account_id)
    spend(tw, account_id, 15 * USD)
    assert tw.available(account_id) == 5 * USD
    payload = event("charge.refunded", charge(sid, refunded_cents=2000))
    answer = deliver(tw, payload)
    assert answer.json()["outcome"] == "reversed"
    assert tw.available(account_id) == 0  # never below zero
    row = order(tw, order_id)
    assert (row.refunded_nano, row.reversed_nano, row.written_off_nano) == (
        20 * USD, 20 * USD, 15 * USD)
    assert deliver(tw, payload).json()["replay"] is True
    assert deliver(tw, event("charge.refunded", charge(sid, refunded_cents=2000))
                   ).json()["outcome"] == "nothing_due"
    with tw.db.read() as conn:
        entry = conn.execute(sa.select(entries).where(entries.c.account_id == account_id,
                                                      entries.c.kind == "reverse")).one()
        lines = sorted((p.account_id, p.amount_nano) for p in conn.execute(
            sa.select(postings).where(postings.c.entry_id == entry.id)))
        day = conn.execute(sa.select(sa.func.sum(wallet_days.c.written_off_nano)).where(
            wallet_days.c.account_id == account_id)).scalar_one()
    assert lines == sorted([(ledger.FUNDING, 20 * USD), (account_id, -5 * USD),
                            (ledger.WRITEOFF, -15 * USD)])
    assert day == 15 * USD  # shown on the statement as written off
    month = time.strftime("%Y-%m", time.gmtime())
    statement = tw.http().get(f"/v1/billing/statement?month={month}", headers={
        "Authorization": f"Bearer {tw.key(account_id)}"}).json()
    # top-ups net of what was taken back: 20.00 - 5.00; charges 15.00; 15.00 written off
    assert (statement["topups_usd"], statement["charges_usd"], statement["written_off_usd"],
            statement["closing_balance_usd"]) == (
        "15.000000000", "15.000000000", "15.000000000", "0.000000000")
    assert tw.verify() == []


def test_partial_refunds_then_a_dispute_never_take_back_more_than_the_order(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd="3")
    order_id, sid = credited_order(tw, stripe_fake, account_id)  # 23.00 available
    assert deliver(tw, event("charge.refunded", charge(sid, refunded_cents=500))
                   ).json()["outcome"] == "reversed"
    assert tw.available(account_id) == 18 * USD
    # an older refund event arriving late changes nothing (totals only grow)
    assert deliver(tw, event("charge.refunded", charge(sid, refunded_cents=300))
                   ).json()["outcome"] == "nothing_due"
    dispute = {"id": "dp_1", "object": "dispute", "charge": f"ch_{sid}",
               "payment_intent": f"pi_test_{sid[8:]}", "amount": 2000, "currency": "usd"}
    assert deliver(tw, event("charge.dispute.created", dispute)).json()["outcome"] == "reversed"
    assert tw.available(account_id) == 3 * USD  # 20.00 taken back in all, never more
    row = order(tw, order_id)
    assert (row.refunded_nano, row.disputed_nano, row.reversed_nano, row.written_off_nano) == (
        5 * USD, 20 * USD, 20 * USD, 0)
    assert tw.verify() == []


def test_refunds_of_unknown_charges_or_other_currencies_move_nothing(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    account_id = tw.account(usd=None)
    _, sid = credited_order(tw, stripe_fake, account_id)
    unknown = charge("cs_test_unknown", refunded_cents=2000)
    assert deliver(tw, event("charge.refunded", unknown)).json()["outcome"] == (
        "unknown_payment")
    answer = deliver(tw, event("charge.refunded", charge(sid, refunded_cents=2000,
                                                         currency="eur")))
    assert answer.status_code == 400
    assert tw.available(account_id) == 20 * USD
    assert tw.verify() == []


# ----------------------------------------------------------------------------- console session


def test_a_console_session_starts_a_checkout_with_its_csrf_token(tw: Tollway) -> None:
    from tollway.billing import logins
    from webclient import csrf, login

    account_id = tw.account(usd=None)
    with tw.db.write() as conn:
        logins.set_password_hash(conn, account_id, logins.hash_password("correct horse"))
        name = conn.execute(sa.text("SELECT name FROM accounts WHERE id = :i"),
                            {"i": account_id}).scalar_one()
    http = tw.http()
    assert login(http, name, "correct horse").status_code == 303
    refused = http.post("/v1/billing/checkout", json={"amount_usd": "10"})
    assert refused.status_code == 403 and error_of(refused)["code"] == "invalid_csrf_token"
    answer = http.post("/v1/billing/checkout", json={"amount_usd": "10"},
                       headers={"X-CSRF-Token": csrf(http, "/console")})
    assert answer.status_code == 201, answer.text
    assert order(tw, answer.json()["order_id"]).account_id == account_id


# ----------------------------------------------------------------------------- migration


def test_migrations_0008_and_0009_match_the_tables_and_downgrade(db: Any) -> None:
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from tollway.store.migrate import alembic_config, current_revision, head_revision, upgrade
    from tollway.store.tables import metadata

    def drift() -> list[object]:
        with db.read() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), metadata)
        return [d for d in diffs if "payment_" in repr(d) or "promo" in repr(d)]

    assert current_revision(db) == head_revision() and drift() == []
    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0007")
    with db.read() as conn:
        assert not sa.inspect(conn).has_table("payment_orders")
        assert not sa.inspect(conn).has_table("payment_events")
        assert not sa.inspect(conn).has_table("promo_grants")
        assert "promo_nano" not in {c["name"] for c in sa.inspect(conn).get_columns("accounts")}
    upgrade(db)
    assert current_revision(db) == head_revision() and drift() == []


# ----------------------------------------------------------------------------- console pages


def signed_in(tw: Tollway, account_id: int) -> Any:
    from tollway.billing import logins
    from webclient import login

    with tw.db.write() as conn:
        logins.set_password_hash(conn, account_id, logins.hash_password("correct horse"))
        name = conn.execute(sa.text("SELECT name FROM accounts WHERE id = :i"),
                            {"i": account_id}).scalar_one()
    http = tw.http()
    assert login(http, name, "correct horse").status_code == 303
    return http


def test_the_console_sends_a_chosen_amount_to_checkout_and_refuses_bad_ones(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    from webclient import csrf

    account_id = tw.account(usd=None)
    http = signed_in(tw, account_id)
    page = http.get("/console/billing").text
    assert all(f">${p}</button>" in page for p in ("10.00", "20.00", "50.00"))
    token = csrf(http, "/console/billing")
    bad = http.post("/console/billing", data={"csrf_token": token, "custom": "4.99"})
    assert bad.status_code == 400 and "amount_usd must be from 5.00 to 500.00 USD" in bad.text
    sent = http.post("/console/billing", data={"csrf_token": token, "custom": "12.34"},
                     follow_redirects=False)
    assert sent.status_code == 303 and sent.headers["location"].startswith(
        f"{stripe_fake.base}/pay/cs_test_")
    forged = http.post("/console/billing", data={"csrf_token": "x", "amount": "10.00"},
                       follow_redirects=False)
    assert forged.status_code == 403
    with tw.db.read() as conn:
        amounts = conn.execute(sa.select(payment_orders.c.amount_nano).where(
            payment_orders.c.account_id == account_id)).scalars().all()
    assert amounts == [1234 * CENT]


def test_return_pages_and_receipts_show_only_the_accounts_own_paid_orders(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    alice, bob = tw.account(usd=None), tw.account(usd=None)
    alice_order, _ = credited_order(tw, stripe_fake, alice)
    bob_order, _ = credited_order(tw, stripe_fake, bob)
    open_order, _ = paid_order(tw, stripe_fake, alice, "10")
    http = signed_in(tw, alice)
    shown = http.get(f"/console/billing/return?order={alice_order}")
    assert "Payment received: 20.00 USD was added" in shown.text
    waiting = http.get(f"/console/billing/return?order={open_order}")
    assert "Waiting for Stripe" in waiting.text and 'http-equiv="refresh"' in waiting.text
    canceled = http.get(f"/console/billing/return?order={open_order}&canceled=1")
    assert "Payment cancelled" in canceled.text
    receipt = http.get(f"/console/billing/receipts/{alice_order}")
    assert receipt.status_code == 200 and "@media print" in receipt.text
    assert "Tollway prepaid credit" in receipt.text and "20.00" in receipt.text
    for path in (f"/console/billing/return?order={bob_order}",
                 f"/console/billing/receipts/{bob_order}",
                 f"/console/billing/receipts/{open_order}"):
        assert http.get(path).status_code == 404, path


def test_receipts_are_also_pdfs_for_the_console_and_the_key(
        tw: Tollway, stripe_fake: FakeStripe) -> None:
    """A paid order's receipt as a PDF that parses and says the amount, the order and the
    seller; another account's, an unpaid or a missing order is a 404 on both routes."""
    import io

    from pypdf import PdfReader

    alice, bob = tw.account(usd=None), tw.account(usd=None)
    alice_order, _ = paid_order(tw, stripe_fake, alice, "12.34")
    sid = order(tw, alice_order).session_id
    assert deliver(tw, session_event(stripe_fake, sid)).status_code == 200
    bob_order, _ = credited_order(tw, stripe_fake, bob)
    open_order, _ = paid_order(tw, stripe_fake, alice, "10")
    http = signed_in(tw, alice)
    key = {"Authorization": f"Bearer {tw.key(alice)}"}

    def text_of(answer: Any) -> str:
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "application/pdf"
        assert answer.content.startswith(b"%PDF-")
        reader = PdfReader(io.BytesIO(answer.content))
        assert len(reader.pages) == 1
        return reader.pages[0].extract_text()

    for answer in (http.get(f"/console/billing/receipts/{alice_order}.pdf"),
                   tw.http().get(f"/v1/billing/payments/{alice_order}/receipt.pdf",
                                 headers=key)):
        assert f'filename="receipt-TW-{alice_order}.pdf"' in answer.headers[
            "content-disposition"]
        text = text_of(answer)
        assert f"No. TW-{alice_order}" in text and f"Order {alice_order}," in text
        assert "Acme Gateways GmbH" in text and "Hauptstraße 1" in text
        assert "10115 Berlin" in text and "VAT DE123456789" in text
        assert "12.34 USD" in text and sid in text
    html = http.get(f"/console/billing/receipts/{alice_order}").text
    assert "Acme Gateways GmbH" in html and "12.34" in html
    for other in (bob_order, open_order, 999_999):
        assert http.get(f"/console/billing/receipts/{other}.pdf").status_code == 404
        missing = tw.http().get(f"/v1/billing/payments/{other}/receipt.pdf", headers=key)
        assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    assert tw.http().get(f"/v1/billing/payments/{alice_order}/receipt.pdf").status_code == 401
    assert tw.verify() == []
