"""Auto-recharge: "when the available balance falls below X, charge the saved card to bring
it to Y", at most a monthly cap.

The setting (:func:`save`) is validated like a top-up (decimal strings of at most 2
decimals; ``target > threshold``; every charge within the top-up bounds: ``target`` at most
``TOLLWAY_TOPUP_MAX_USD`` and ``target - threshold`` at least ``TOLLWAY_TOPUP_MIN_USD``).
The card is Stripe's: Tollway creates the Stripe customer, the customer enters a card on a
Checkout Session in ``setup`` mode, and Stripe's ``setup_intent.succeeded`` (or a top-up's
``payment_intent.succeeded`` made with ``setup_future_usage``) names the payment method —
accepted only for the customer Tollway created for that account, never from client input.

The trigger is the ledger's (``ledger.low_balance``): a debit that leaves an armed wallet
below the threshold disarms it and queues an ``auto_recharge.due`` event in the same
transaction, whose one delivery (channel ``recharge``) a deliverer claims like any message
and hands to :func:`run`. So a request never waits for a card, and a request that does not
cross costs no extra statement.

:func:`run` charges ``target - available`` (rounded up to the cent), at most what is left of
the month's cap (the billing time zone's calendar month; pending and succeeded charges
count), and nothing under Stripe's 0.50 USD minimum. One charge is in flight per account
(``store.auto_recharge.start_attempt``); the off-session PaymentIntent's answer credits
the attempt's own amount, and so does ``payment_intent.succeeded`` — whichever comes second
changes nothing. A charge whose answer was lost (network, Stripe's 5xx) keeps its slot and
is charged again under the SAME idempotency key when the delivery is retried
(:class:`AnswerLost`), as is one whose process died, after :data:`STALE_MS`: Stripe answers
a repeated key with the first call's result, so the card is charged at most once and a
second charge can never start while the first one's fate is unknown. A failed charge is
notified (``auto_recharge.failed``) and re-arms, so the next debit tries again; after
``TOLLWAY_AUTO_RECHARGE_MAX_FAILURES`` consecutive failures the setting is paused
(``auto_recharge.paused``) until the customer saves it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy.engine import Connection

from tollway import settings
from tollway.billing import credits, payments, stripe_checkout
from tollway.billing.payments import NANO_PER_CENT, EventResult, Write
from tollway.billing.views import iso
from tollway.errors import InvalidRequest, PaymentsUnavailable
from tollway.ledger import periods
from tollway.money import format_usd
from tollway.store import auto_recharge as store
from tollway.store import notifications

log = logging.getLogger("tollway.payments")

CURRENCY = payments.CURRENCY
#: Stripe's smallest USD charge: a capped charge below it is not attempted.
MIN_CHARGE_CENTS = 50
#: Provider events this module applies (``POST /webhooks/stripe``).
EVENTS = ("payment_intent.succeeded", "setup_intent.succeeded")
FIELDS = ("enabled", "threshold_usd", "target_usd", "monthly_cap_usd")
#: A charge in flight longer than this lost its process (Stripe's calls time out well
#: before): the next due charge resumes it under its idempotency key (``store.resumable``).
STALE_MS = 15 * 60_000


class AnswerLost(Exception):
    """Stripe's answer to a charge was lost: the delivery must be retried (same key)."""


def max_failures() -> int:
    value = settings.get("auto_recharge_max_failures").strip()
    if not value.isdigit() or int(value) < 1:
        raise InvalidRequest(f"TOLLWAY_AUTO_RECHARGE_MAX_FAILURES must be a whole number >= 1, "
                             f"got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- setting


def _usd(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, str) or not payments.PLAIN.fullmatch(value.strip()):
        raise InvalidRequest(f"{name} must be a decimal string with at most 2 decimals such "
                             f"as \"20.00\", got {value!r}", param=name)
    return payments.cents_nano(value, name, allow_zero=True)


def parse(body: object, current: Any) -> dict[str, Any]:
    """The columns a ``PUT /v1/billing/auto_recharge`` body sets, or 400 invalid_request.
    ``enabled`` is required; the amounts are required to enable, and kept from ``current``
    when left out."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    if unknown := sorted(set(body) - set(FIELDS)):
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}; expected "
                             f"{', '.join(FIELDS)}")
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise InvalidRequest("enabled must be true or false", param="enabled")
    amounts: dict[str, int] = {}
    for name, column in (("threshold_usd", "threshold_nano"), ("target_usd", "target_nano"),
                         ("monthly_cap_usd", "monthly_cap_nano")):
        if name in body:
            amounts[column] = _usd(body, name)
        elif current is not None and getattr(current, column) is not None:
            amounts[column] = int(getattr(current, column))
        else:
            raise InvalidRequest(f"{name} is required", param=name)
    threshold, target, cap = (amounts["threshold_nano"], amounts["target_nano"],
                              amounts["monthly_cap_nano"])
    limits = payments.bounds()
    low, high = payments.usd_cents(limits.min_nano), payments.usd_cents(limits.max_nano)
    if target <= threshold:
        raise InvalidRequest("target_usd must be greater than threshold_usd", param="target_usd")
    if target > limits.max_nano:
        raise InvalidRequest(f"target_usd may be at most {high} USD (the largest top-up)",
                             param="target_usd")
    if target - threshold < limits.min_nano:
        raise InvalidRequest(f"target_usd - threshold_usd must be at least {low} USD (the "
                             "smallest top-up)", param="target_usd")
    if cap < limits.min_nano:
        raise InvalidRequest(f"monthly_cap_usd must be at least {low} USD (the smallest "
                             "top-up)", param="monthly_cap_usd")
    return {"enabled": enabled, **amounts}


def view(conn: Connection, account_id: int, *, at_ms: int) -> dict[str, Any]:
    """The setting as the API shows it (all None before the first save)."""
    row = store.get(conn, account_id)
    month_start, _ = periods.bounds(at_ms, "month")
    spent = store.month_spent(conn, account_id, month_start)

    def usd(column: str) -> str | None:
        value = None if row is None else getattr(row, column)
        return None if value is None else format_usd(int(value))
    cap = None if row is None or row.monthly_cap_nano is None else int(row.monthly_cap_nano)
    return {"object": "auto_recharge", "account_id": account_id,
            "enabled": bool(row is not None and row.enabled),
            "threshold_usd": usd("threshold_nano"), "target_usd": usd("target_nano"),
            "monthly_cap_usd": usd("monthly_cap_nano"),
            "charged_this_month_usd": format_usd(spent),
            "left_this_month_usd": None if cap is None else format_usd(max(0, cap - spent)),
            "card_saved": bool(row is not None and row.payment_method),
            "card_saved_at": iso(row.card_saved_at_ms) if row is not None else None,
            "consecutive_failures": 0 if row is None else int(row.failures),
            "paused": bool(row is not None and row.paused_at_ms is not None),
            "paused_at": iso(row.paused_at_ms) if row is not None else None,
            "in_flight": bool(row is not None and row.in_flight_id is not None),
            "attempts": [attempt_view(a) for a in store.attempts(conn, account_id, limit=10)]}


def attempt_view(row: Any) -> dict[str, Any]:
    return {"id": row.id, "amount_usd": format_usd(row.amount_nano), "status": row.status,
            "payment_intent": row.payment_intent, "error": row.error,
            "created_at": iso(row.created_at_ms), "completed_at": iso(row.completed_at_ms),
            "entry_id": row.entry_id}


def save(conn: Connection, account_id: int, body: object, *, at_ms: int) -> dict[str, Any]:
    """Validate and store a setting (a save resumes a paused one and clears its failures)."""
    values = parse(body, store.get(conn, account_id))
    store.save(conn, account_id, {**values, "paused_at_ms": None, "failures": 0}, at_ms=at_ms)
    return view(conn, account_id, at_ms=at_ms)


def disable(conn: Connection, account_id: int, *, at_ms: int) -> dict[str, Any]:
    if store.get(conn, account_id) is not None:
        store.save(conn, account_id, {"enabled": False}, at_ms=at_ms)
    return view(conn, account_id, at_ms=at_ms)


# ----------------------------------------------------------------------------- the card


async def ensure_customer(write: Write, account_id: int, *, at_ms: int) -> str:
    """The account's Stripe customer, created once (the idempotency key is the account)."""
    row = await write(lambda conn: store.get(conn, account_id), account_id=account_id)
    if row is not None and row.stripe_customer:
        return str(row.stripe_customer)
    customer = await asyncio.to_thread(stripe_checkout.create_customer, account_id=account_id)

    def keep(conn: Connection) -> str:
        found = store.get(conn, account_id)
        if found is not None and found.stripe_customer:
            return str(found.stripe_customer)
        store.save(conn, account_id, {"stripe_customer": customer}, at_ms=at_ms)
        return customer
    return str(await write(keep, account_id=account_id))


async def start_card_setup(write: Write, account_id: int, *, at_ms: int) -> dict[str, Any]:
    """A Checkout Session in setup mode for the account's customer: ``{"id", "url"}``."""
    if not stripe_checkout.configured():
        raise PaymentsUnavailable("card payments are not configured on this server "
                                  "(TOLLWAY_STRIPE_SECRET_KEY, TOLLWAY_STRIPE_WEBHOOK_SECRET)")
    customer = await ensure_customer(write, account_id, at_ms=at_ms)
    base = settings.get("public_url").rstrip("/")
    session = await asyncio.to_thread(
        stripe_checkout.create_setup_session, customer=customer, account_id=account_id,
        success_url=f"{base}/console/billing?card=saved",
        cancel_url=f"{base}/console/billing?card=canceled")
    return {"object": "card_setup", "id": session.id, "url": session.url}


# ----------------------------------------------------------------------------- the charge


@dataclass(frozen=True, slots=True)
class Plan:
    attempt_id: int
    account_id: int
    amount_cents: int
    customer: str
    payment_method: str


def charge_cents(target_nano: int, available_nano: int, cap_left_nano: int) -> int:
    """What a charge is, in cents: what brings the wallet to the target, rounded up to the
    cent (the wallet ends at or just above it), but never more than the cap has left
    (rounded down: the month's charges never pass the cap)."""
    wanted = -(-(target_nano - available_nano) // NANO_PER_CENT)
    return max(0, min(wanted, max(0, cap_left_nano) // NANO_PER_CENT))


def begin(conn: Connection, account_id: int, *, at_ms: int) -> Plan | str:
    """Claim the account's in-flight slot for a charge of what it needs, or say why not."""
    row = store.get(conn, account_id)
    if (row is None or not row.enabled or row.paused_at_ms is not None
            or not row.payment_method or not row.stripe_customer
            or row.threshold_nano is None):
        return "auto-recharge is not active"
    lost = store.resumable(conn, row.in_flight_id, stale_before_ms=at_ms - STALE_MS)
    if lost is not None:  # its fate decides what, if anything, is charged next
        return Plan(int(lost.id), account_id, int(lost.amount_nano) // NANO_PER_CENT,
                    str(row.stripe_customer), str(row.payment_method))
    available = store.available(conn, account_id)
    if available >= row.threshold_nano:
        store.set_armed(conn, account_id, True)
        return "the balance is no longer below the threshold"
    month_start, _ = periods.bounds(at_ms, "month")
    left = int(row.monthly_cap_nano) - store.month_spent(conn, account_id, month_start)
    cents = charge_cents(int(row.target_nano), available, left)
    if cents < MIN_CHARGE_CENTS:
        return "the monthly cap is reached"
    attempt_id = store.start_attempt(conn, account_id, cents * NANO_PER_CENT, currency=CURRENCY,
                                     month_start_ms=month_start, at_ms=at_ms)
    if attempt_id is None:
        return "another recharge is in flight"
    return Plan(attempt_id, account_id, cents, str(row.stripe_customer),
                str(row.payment_method))


def credit(conn: Connection, attempt_id: int, *, payment_intent: str, at_ms: int) -> int:
    """Credit a paid attempt's own amount, once: what was credited (0 if already)."""
    won = store.succeed(conn, attempt_id, payment_intent=payment_intent, at_ms=at_ms)
    if won is None:
        return 0
    account_id, amount = int(won.account_id), int(won.amount_nano)
    topup = credits.topup(conn, account_id, amount, idempotency_key=f"recharge:{attempt_id}",
                          at_ms=at_ms, note=f"auto-recharge {attempt_id}",
                          source="auto_recharge")
    store.set_entry(conn, attempt_id, topup.entry_id)
    notifications.enqueue(conn, account_id, "auto_recharge.succeeded", {
        "attempt_id": attempt_id, "amount_usd": format_usd(amount),
        "available_usd": format_usd(topup.balance_nano)}, at_ms=at_ms,
        dedupe_key=f"recharge:{attempt_id}")
    return amount


def finish(conn: Connection, plan: Plan, charge: stripe_checkout.Charge, *,
           at_ms: int, pause_after: int | None = None) -> str:
    """Book Stripe's answer to a planned charge; what happened, for the delivery log."""
    if charge.succeeded and charge.payment_intent:
        credited = credit(conn, plan.attempt_id, payment_intent=charge.payment_intent,
                          at_ms=at_ms)
        return (f"charged and credited {format_usd(credited)} USD" if credited
                else "charged (already credited by Stripe's event)")
    error = charge.error or "the charge failed"
    if charge.lost:
        store.mark_lost(conn, plan.attempt_id, error=error)
        return f"{error}: charged again under the same idempotency key on the next try"
    if charge.payment_intent:
        store.set_payment_intent(conn, plan.attempt_id, charge.payment_intent)
    failures = store.fail(conn, plan.attempt_id, error=error, at_ms=at_ms)
    if failures is None:
        return "already settled"
    data = {"attempt_id": plan.attempt_id, "amount_usd": format_usd(
        plan.amount_cents * NANO_PER_CENT), "error": error, "consecutive_failures": failures}
    if failures >= (max_failures() if pause_after is None else pause_after):
        store.save(conn, plan.account_id, {"paused_at_ms": at_ms}, at_ms=at_ms)
        notifications.enqueue(conn, plan.account_id, "auto_recharge.paused", data, at_ms=at_ms)
        return f"failed ({error}); paused after {failures} consecutive failures"
    store.set_armed(conn, plan.account_id, True)
    notifications.enqueue(conn, plan.account_id, "auto_recharge.failed", data, at_ms=at_ms)
    return f"failed ({error})"


Writer = Callable[[Callable[[Connection], Any]], Awaitable[Any]]


async def run(write: Writer, account_id: int, *, clock_ms: Callable[[], int]) -> str:
    """Make the charge an ``auto_recharge.due`` event asks for (the deliverer's ``recharge``
    channel): plan it in one transaction, call Stripe outside any, book the answer in
    another. Returns what happened, for the delivery log; raises :class:`AnswerLost` when
    Stripe's answer was lost (the deliverer retries, and the retry resumes the charge)."""
    pause_after = max_failures()  # a bad setting refuses before any charge, not after
    plan = await write(lambda conn: begin(conn, account_id, at_ms=clock_ms()))
    if isinstance(plan, str):
        return f"no charge: {plan}"
    charge = await asyncio.to_thread(
        stripe_checkout.charge_saved_card, attempt_id=plan.attempt_id, account_id=account_id,
        customer=plan.customer, payment_method=plan.payment_method,
        amount_cents=plan.amount_cents, currency=CURRENCY)
    outcome: str = await write(lambda conn: finish(conn, plan, charge, at_ms=clock_ms(),
                                                   pause_after=pause_after))
    log.info("auto-recharge %s of account %s: %s", plan.attempt_id, account_id, outcome)
    if charge.lost:
        raise AnswerLost(outcome)
    return outcome


# ----------------------------------------------------------------------------- events


def event_account(conn: Connection, event: dict[str, Any]) -> int | None:
    """The account an event would credit or change (to order the writer's batch)."""
    obj = payments.event_object(event)
    found = _metadata(obj).get("recharge_id")
    if isinstance(found, str) and found.isdigit():
        row = store.attempt(conn, int(found))
        if row is not None:
            return int(row.account_id)
    customer = obj.get("customer")
    row = store.by_customer(conn, customer) if isinstance(customer, str) else None
    return None if row is None else int(row.account_id)


def _metadata(obj: dict[str, Any]) -> dict[str, Any]:
    found = obj.get("metadata")
    return found if isinstance(found, dict) else {}


def handle_event(conn: Connection, event: dict[str, Any], *, at_ms: int) -> EventResult:
    """Apply ``payment_intent.succeeded`` / ``setup_intent.succeeded`` once per event id."""
    obj = payments.event_object(event)

    def apply(event_id: str, kind: str) -> EventResult:
        base = EventResult(event_id, kind, "unknown_payment")
        saved = _save_card(conn, kind, obj, at_ms)
        recharge = _metadata(obj).get("recharge_id")
        if kind == "payment_intent.succeeded" and isinstance(recharge, str):
            return _recharge_paid(conn, base, recharge, obj, at_ms)
        if saved is not None:
            return replace(base, outcome="card_saved", account_id=saved)
        return replace(base, outcome="unknown_customer" if kind == "setup_intent.succeeded"
                       else "unknown_payment")
    return payments.once(conn, event, apply, at_ms=at_ms)


def _save_card(conn: Connection, kind: str, obj: dict[str, Any], at_ms: int) -> int | None:
    """Keep the payment method of a set-up (or a top-up made to save the card) for the
    account whose Stripe customer it belongs to; that account, or None."""
    customer, method = obj.get("customer"), obj.get("payment_method")
    if not isinstance(customer, str) or not isinstance(method, str):
        return None
    if kind == "payment_intent.succeeded" and obj.get("setup_future_usage") != "off_session":
        return None
    row = store.by_customer(conn, customer)
    if row is None:
        return None
    store.save(conn, int(row.account_id), {"payment_method": method, "card_saved_at_ms": at_ms},
               at_ms=at_ms)
    return int(row.account_id)


def _recharge_paid(conn: Connection, base: EventResult, recharge: str, obj: dict[str, Any],
                   at_ms: int) -> EventResult:
    row = store.attempt(conn, int(recharge)) if recharge.isdigit() else None
    if row is None:
        return base
    result = replace(base, account_id=int(row.account_id))
    intent = obj.get("id")
    if (str(_metadata(obj).get("account_id")) != str(row.account_id)
            or not isinstance(intent, str)
            or row.payment_intent not in (None, intent)):
        return replace(result, outcome="account_mismatch")
    if (obj.get("currency") != row.currency
            or obj.get("amount") != int(row.amount_nano) // NANO_PER_CENT):
        return replace(result, outcome="amount_mismatch")
    credited = credit(conn, int(row.id), payment_intent=intent, at_ms=at_ms)
    return replace(result, outcome="credited" if credited else "already_paid",
                   credited_nano=credited)


# ----------------------------------------------------------------------------- admin


def overview(conn: Connection, *, at_ms: int) -> list[dict[str, Any]]:
    """Every account's setting (the operator's view)."""
    return [view(conn, int(row.account_id), at_ms=at_ms) for row in store.all_settings(conn)]
