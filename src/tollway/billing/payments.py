"""Money in by card: checkout orders, the payment provider's events, refunds and disputes.

A top-up starts as an *order row* Tollway writes before the customer goes anywhere: account,
amount (USD, at most 2 decimals, within the operator's bounds) and currency. The provider's
Checkout Session is created for that row (``billing.stripe_checkout``) and its id stored on
it. When the provider reports the session paid, the credit is the **order row's** amount,
never a number from the event; the event must also agree with the row (the session's own
id, its ``client_reference_id`` and account metadata, its amount and currency) or nothing is
credited.

Exactly once, without trusting a lock: in one transaction the event id is inserted only if
new (a replayed event changes nothing), the order moves ``open → paid`` with a guarded
UPDATE (a second event for the same session changes nothing), and the ledger top-up is
booked with the idempotency key ``order:<id>``. Two deliveries racing on two connections
serialise on the event's index entry or the order's row; the loser sees the winner's
commit and credits nothing.

Refunds and disputes take money back (``ledger.reversals``): the order keeps the provider's
running totals (refunded, disputed), and each event reverses what those totals add beyond
what was already reversed, capped at the order's amount — so a replay, or events in any
order, never take back twice. The wallet gives what it has available; the rest is written
off and shown on the order, the statement and the notification.

Every event ends in an *outcome* stored with it (see :data:`OUTCOMES`). Outcomes that say
the event contradicts Tollway's records are answered 400 (the provider shows them as
failed deliveries); everything else 200, since redelivering it would change nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection

from tollway import settings
from tollway.billing import credits, stripe_checkout
from tollway.billing.views import iso
from tollway.errors import InvalidRequest, PaymentsUnavailable, TollwayError
from tollway.ledger.reversals import reverse_topup
from tollway.money import NANO_PER_USD, MoneyFormatError, format_usd, parse_decimal
from tollway.store import notifications
from tollway.store import payments as store
from tollway.store import usage as usage_store

log = logging.getLogger("tollway.payments")
T = TypeVar("T")

CURRENCY = "usd"
PLAIN = re.compile(r"\d{1,9}(\.\d{1,2})?")
NANO_PER_CENT = NANO_PER_USD // 100
#: Outcome of each handled event; True: answered 400 (it contradicts Tollway's records).
OUTCOMES = {
    "credited": False,          # the order's amount was topped up
    "already_paid": False,      # another event already credited this order
    "awaiting_payment": False,  # completed, but the payment method settles later
    "payment_failed": False,    # an asynchronous payment failed: the order is closed
    "expired": False,           # the session expired unpaid: the order is closed
    "reversed": False,          # a refund or dispute took money back
    "nothing_due": False,       # a refund or dispute already reversed in full
    "unknown_session": False,   # not a session of a Tollway order: ignored
    "unknown_payment": False,   # a charge Tollway did not sell: ignored
    "not_paid": False,          # a refund for an order never credited: nothing to take back
    "card_saved": False,        # a card saved for auto-recharge (billing.auto_recharge)
    "unknown_customer": False,  # a card set up for a customer Tollway did not create
    "account_mismatch": True,   # the session names another order or account
    "amount_mismatch": True,    # the session's amount or currency is not the order's
}
CHECKOUT_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded",
                   "checkout.session.async_payment_failed", "checkout.session.expired")
REVERSAL_EVENTS = ("charge.refunded", "charge.dispute.created")


@dataclass(frozen=True, slots=True)
class TopupBounds:
    min_nano: int
    max_nano: int
    presets_nano: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EventResult:
    event_id: str
    type: str
    outcome: str
    order_id: int | None = None
    account_id: int | None = None
    credited_nano: int = 0
    taken_nano: int = 0
    written_off_nano: int = 0
    replay: bool = False

    @property
    def refused(self) -> bool:
        return OUTCOMES.get(self.outcome, False)


def cents_nano(value: object, what: str, *, allow_zero: bool = False) -> int:
    """An amount in USD with at most 2 decimals, as nano-USD."""
    try:
        amount = parse_decimal(value, what=what)
    except MoneyFormatError as exc:
        raise InvalidRequest(str(exc)) from None
    if amount != amount.quantize(Decimal("0.01")) or amount < 0 or (
            amount == 0 and not allow_zero):
        raise InvalidRequest(f"{what} must be a {'non-negative' if allow_zero else 'positive'}"
                             f" USD amount with at most 2 decimals, got {value!r}")
    return int(amount * 100) * NANO_PER_CENT


def bounds() -> TopupBounds:
    """The operator's top-up bounds and presets (settings ``topup_*``)."""
    low = cents_nano(settings.get("topup_min_usd"), "TOLLWAY_TOPUP_MIN_USD")
    high = cents_nano(settings.get("topup_max_usd"), "TOLLWAY_TOPUP_MAX_USD")
    presets = tuple(cents_nano(p.strip(), "TOLLWAY_TOPUP_PRESETS_USD")
                    for p in settings.get("topup_presets_usd").split(",") if p.strip())
    return TopupBounds(low, high, tuple(p for p in presets if low <= p <= high))


def parse_amount(value: object, limits: TopupBounds) -> int:
    """``amount_usd`` of a checkout request as nano-USD, or 400 invalid_request."""
    if not isinstance(value, str | int | Decimal) or isinstance(value, bool):
        raise InvalidRequest("amount_usd must be a decimal string such as \"20.00\"")
    if isinstance(value, str) and not PLAIN.fullmatch(value.strip()):
        raise InvalidRequest(f"amount_usd must be written like \"20.00\" (at most 2 "
                             f"decimals), got {value!r}")
    nano = cents_nano(value, "amount_usd")
    if not limits.min_nano <= nano <= limits.max_nano:
        raise InvalidRequest(f"amount_usd must be from {usd_cents(limits.min_nano)} to "
                             f"{usd_cents(limits.max_nano)} USD, got {value!r}")
    return nano


def usd_cents(nano: int) -> str:
    return f"{nano // NANO_PER_USD}.{nano % NANO_PER_USD // NANO_PER_CENT:02d}"


def create_order(conn: Connection, account_id: int, amount_nano: int, *, at_ms: int) -> int:
    return store.insert_order(conn, account_id=account_id, provider="stripe",
                              amount_nano=amount_nano, currency=CURRENCY, at_ms=at_ms)


def client_reference(order_id: int) -> str:
    return f"tollway-order-{order_id}"


class Write(Protocol):
    """How the HTTP layers hand over the writer (``Context.write``)."""

    def __call__(self, fn: Callable[[Connection], T], *,
                 account_id: int | None = None) -> Awaitable[T]: ...


async def start_checkout(write: Write, account_id: int, amount: object, *,
                         at_ms: int) -> dict[str, Any]:
    """Write the order, create its Checkout Session (off the event loop), store the
    session's id on the order; a refused or failed session closes the order as ``failed``."""
    amount_nano = parse_amount(amount, bounds())
    if not stripe_checkout.configured():
        raise PaymentsUnavailable("card top-ups are not configured on this server "
                                  "(TOLLWAY_STRIPE_SECRET_KEY, TOLLWAY_STRIPE_WEBHOOK_SECRET)")
    order_id = await write(lambda conn: create_order(conn, account_id, amount_nano,
                                                     at_ms=at_ms), account_id=account_id)
    base = settings.get("public_url").rstrip("/")
    try:
        session = await asyncio.to_thread(
            stripe_checkout.create_session, order_id=order_id, account_id=account_id,
            amount_cents=amount_nano // NANO_PER_CENT, currency=CURRENCY,
            reference=client_reference(order_id),
            success_url=f"{base}/console/billing/return?order={order_id}"
                        "&session_id={CHECKOUT_SESSION_ID}",
            cancel_url=f"{base}/console/billing/return?order={order_id}&canceled=1")
    except TollwayError:
        await write(lambda conn: store.mark_closed(conn, order_id, "failed"),
                    account_id=account_id)
        raise
    await write(lambda conn: store.set_session(conn, order_id, session.id),
                account_id=account_id)
    return {"object": "checkout", "id": session.id, "url": session.url, "order_id": order_id,
            "amount_usd": format_usd(amount_nano), "currency": CURRENCY}


# ----------------------------------------------------------------------------- events


def order_account(conn: Connection, event: dict[str, Any]) -> int | None:
    """The account whose money an event would move (to order the writer's batch), if any."""
    order = _order_of(conn, event)
    return None if order is None else int(order.account_id)


def _order_of(conn: Connection, event: dict[str, Any]) -> Any:
    obj = event_object(event)
    kind = event.get("type")
    if kind in CHECKOUT_EVENTS and isinstance(obj.get("id"), str):
        return store.by_session(conn, obj["id"])
    if kind in REVERSAL_EVENTS and isinstance(obj.get("payment_intent"), str):
        return store.by_payment_intent(conn, obj["payment_intent"])
    return None


def event_object(event: dict[str, Any]) -> dict[str, Any]:
    """The event's ``data.object`` (empty if it has none)."""
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else {}


def handles(event: dict[str, Any]) -> bool:
    return event.get("type") in CHECKOUT_EVENTS + REVERSAL_EVENTS


def handle_event(conn: Connection, event: dict[str, Any], *, at_ms: int) -> EventResult:
    """Apply one verified provider event, at most once per event id (see the module doc)."""
    def apply(event_id: str, kind: str) -> EventResult:
        order = _order_of(conn, event)
        if order is None:
            return EventResult(event_id, kind, "unknown_session" if kind in CHECKOUT_EVENTS
                               else "unknown_payment")
        if kind in CHECKOUT_EVENTS:
            return _checkout(conn, event_id, kind, event_object(event), order, at_ms)
        return _reversal(conn, event_id, kind, event_object(event), order, at_ms)
    return once(conn, event, apply, at_ms=at_ms)


def once(conn: Connection, event: dict[str, Any],
         apply: Callable[[str, str], EventResult], *, at_ms: int) -> EventResult:
    """Run ``apply(event_id, type)`` for an event id never seen, in the caller's
    transaction, and store its outcome; a replay returns the first outcome and changes
    nothing (the event id's insert is the guard)."""
    event_id, kind = str(event["id"]), str(event["type"])
    if not store.record_event(conn, event_id=event_id, type_=kind, order_id=None,
                              outcome="pending", at_ms=at_ms):
        first = store.event(conn, event_id)
        return EventResult(event_id, kind, str(first.outcome), first.order_id, replay=True)
    result = apply(event_id, kind)
    store.set_event_outcome(conn, event_id, result.outcome, result.order_id)
    return result


def _checkout(conn: Connection, event_id: str, kind: str, session: dict[str, Any],
              order: Any, at_ms: int) -> EventResult:
    base = EventResult(event_id, kind, "", int(order.id), int(order.account_id))
    found = session.get("metadata")
    metadata: dict[str, Any] = found if isinstance(found, dict) else {}
    if (session.get("client_reference_id") != client_reference(order.id)
            or str(metadata.get("account_id")) != str(order.account_id)):
        return replace(base, outcome="account_mismatch")
    if (session.get("currency") != order.currency
            or session.get("amount_total") != order.amount_nano // NANO_PER_CENT):
        return replace(base, outcome="amount_mismatch")
    if kind == "checkout.session.expired":
        store.mark_closed(conn, order.id, "expired")
        return replace(base, outcome="expired")
    if kind == "checkout.session.async_payment_failed":
        store.mark_closed(conn, order.id, "failed")
        return replace(base, outcome="payment_failed")
    if session.get("payment_status") != "paid":
        return replace(base, outcome="awaiting_payment")
    intent = session.get("payment_intent")
    won = store.mark_paid(conn, order.id, at_ms=at_ms,
                          payment_intent=intent if isinstance(intent, str) else None)
    if won is None:
        return replace(base, outcome="already_paid")
    account_id, amount = int(won[0]), int(won[1])
    topup = credits.topup(conn, account_id, amount, idempotency_key=f"order:{order.id}",
                          at_ms=at_ms, note=f"card top-up, order {order.id}", source="card")
    store.set_entry(conn, order.id, topup.entry_id)
    return replace(base, outcome="credited", credited_nano=amount)


def _reversal(conn: Connection, event_id: str, kind: str, obj: dict[str, Any], order: Any,
              at_ms: int) -> EventResult:
    base = EventResult(event_id, kind, "", int(order.id), int(order.account_id))
    field = "amount_refunded" if kind == "charge.refunded" else "amount"
    cents = obj.get(field)
    if (obj.get("currency") != order.currency or not isinstance(cents, int)
            or isinstance(cents, bool) or cents < 0):
        return replace(base, outcome="amount_mismatch")
    total = cents * NANO_PER_CENT
    claimed = store.claim_reversal(conn, order.id, **(
        {"refunded_nano": total} if kind == "charge.refunded" else {"disputed_nano": total}))
    if claimed is None:
        return replace(base, outcome="not_paid")
    account_id, amount, refunded, disputed, reversed_ = (int(v) for v in claimed)
    target = min(amount, refunded + disputed)
    due = target - reversed_
    if due <= 0:
        return replace(base, outcome="nothing_due")
    what = "refund" if kind == "charge.refunded" else "dispute"
    result = reverse_topup(conn, account_id, due, idempotency_key=f"order:{order.id}:{target}",
                           at_ms=at_ms, note=f"card {what}, order {order.id}")
    store.add_reversal(conn, order.id, reversed_nano=due,
                       written_off_nano=result.written_off_nano)
    usage_store.insert_event(conn, event_id=f"entry-{result.entry_id}", account_id=account_id,
                             type_="refund", at_ms=at_ms, credit_nano=-result.taken_nano,
                             note=f"card {what}, order {order.id}")
    notifications.enqueue(conn, account_id, "payment.reversed", {
        "order_id": order.id, "reason": what, "amount_usd": format_usd(due),
        "taken_usd": format_usd(result.taken_nano),
        "written_off_usd": format_usd(result.written_off_nano),
        "available_usd": format_usd(result.balance_nano)}, at_ms=at_ms,
        dedupe_key=f"reverse:{result.entry_id}")
    return replace(base, outcome="reversed", taken_nano=result.taken_nano,
                       written_off_nano=result.written_off_nano)


# ----------------------------------------------------------------------------- views


def order_view(row: Any) -> dict[str, Any]:
    return {"object": "payment_order", "id": row.id, "account_id": row.account_id,
            "provider": row.provider, "amount_usd": format_usd(row.amount_nano),
            "currency": row.currency, "status": row.status, "session_id": row.session_id,
            "created_at": iso(row.created_at_ms), "paid_at": iso(row.paid_at_ms),
            "entry_id": row.entry_id, "refunded_usd": format_usd(row.refunded_nano),
            "disputed_usd": format_usd(row.disputed_nano),
            "reversed_usd": format_usd(row.reversed_nano),
            "written_off_usd": format_usd(row.written_off_nano)}


def orders_page(conn: Connection, account_id: int, *, limit: int,
                cursor: int | None) -> dict[str, Any]:
    rows = store.page(conn, account_id, limit=limit + 1, before_id=cursor)
    more = len(rows) > limit
    rows = rows[:limit]
    return {"object": "list", "data": [order_view(r) for r in rows],
            "next_cursor": str(rows[-1].id) if more else None, "has_more": more}
