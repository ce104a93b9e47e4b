"""The network edge to Stripe: Checkout Sessions made with the official ``stripe`` library,
webhook payloads verified with it, and auto-recharge's customers, card set-up sessions and
off-session charges (:func:`create_customer`, :func:`create_setup_session`,
:func:`charge_saved_card`).

Only two calls are made: creating a Checkout Session for an order (mode ``payment``, one line
item of the order's amount, ``client_reference_id`` and metadata naming the order and its
account, the order id as Stripe's idempotency key so a retried call makes no second session)
and verifying a webhook signature (``Stripe-Signature``: HMAC-SHA256 of the timestamp and the
raw body under the endpoint's secret; the timestamp must be within 5 minutes). The API
address comes from ``stripe_api_base`` so tests run against a fake on 127.0.0.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from tollway import settings
from tollway.errors import (
    InvalidRequest,
    InvalidSignature,
    PaymentProviderError,
    PaymentsUnavailable,
)

if TYPE_CHECKING:
    import stripe

#: Seconds a webhook signature's timestamp may be old (Stripe's own default).
SIGNATURE_TOLERANCE_S = 300


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    url: str


def configured() -> bool:
    return bool(settings.get("stripe_secret_key") and settings.get("stripe_webhook_secret"))


def _client() -> stripe.StripeClient:
    import stripe  # noqa: PLC0415 - 12 MiB per worker: loaded when payments are used

    key = settings.get("stripe_secret_key")
    if not key:
        raise PaymentsUnavailable("card top-ups are not configured on this server "
                                  "(TOLLWAY_STRIPE_SECRET_KEY)")
    return stripe.StripeClient(key, base_addresses={"api": settings.get("stripe_api_base")},
                               max_network_retries=2)


def create_session(*, order_id: int, account_id: int, amount_cents: int, currency: str,
                   reference: str, success_url: str, cancel_url: str) -> CheckoutSession:
    """A Checkout Session for one order (blocking: run it off the event loop)."""
    import stripe  # noqa: PLC0415 - see _client

    client = _client()
    try:
        session = client.v1.checkout.sessions.create(params={
            "mode": "payment",
            "client_reference_id": reference,
            "metadata": {"order_id": str(order_id), "account_id": str(account_id)},
            "payment_intent_data": {"metadata": {"order_id": str(order_id),
                                                 "account_id": str(account_id)}},
            "line_items": [{"quantity": 1, "price_data": {
                "currency": currency, "unit_amount": amount_cents,
                "product_data": {"name": "Tollway prepaid credit"}}}],
            "success_url": success_url,
            "cancel_url": cancel_url,
        }, options={"idempotency_key": f"tollway-order-{order_id}"})
    except stripe.StripeError as exc:
        raise PaymentProviderError(f"Stripe refused the checkout: {exc.user_message or exc}"
                                   ) from None
    if not session.id or not session.url:
        raise PaymentProviderError("Stripe answered a checkout session without id or url")
    return CheckoutSession(session.id, session.url)


@dataclass(frozen=True, slots=True)
class Charge:
    """What Stripe answered an off-session charge: ``succeeded``, or not (``error`` says
    why: a decline, a card that needs the customer, or no answer at all)."""

    payment_intent: str | None
    succeeded: bool
    error: str | None = None
    #: no answer (network, Stripe's 5xx or 429 after the library's retries): the card may or
    #: may not have been charged; only a call with the same idempotency key may follow
    lost: bool = False


def create_customer(*, account_id: int) -> str:
    """A Stripe customer for an account's saved card (blocking)."""
    import stripe  # noqa: PLC0415 - see _client

    try:
        customer = _client().v1.customers.create(
            params={"metadata": {"account_id": str(account_id)},
                    "description": f"Tollway account {account_id}"},
            options={"idempotency_key": f"tollway-customer-{account_id}"})
    except stripe.StripeError as exc:
        raise PaymentProviderError(f"Stripe refused the customer: {exc.user_message or exc}"
                                   ) from None
    return str(customer.id)


def create_setup_session(*, customer: str, account_id: int, success_url: str,
                         cancel_url: str) -> CheckoutSession:
    """A Checkout Session in ``setup`` mode: the customer enters a card, Stripe saves it for
    off-session use and reports ``setup_intent.succeeded`` (blocking)."""
    import stripe  # noqa: PLC0415 - see _client

    metadata: dict[str, str] = {"account_id": str(account_id), "purpose": "auto_recharge"}
    try:
        session = _client().v1.checkout.sessions.create(params={  # type: ignore[arg-type]
            "mode": "setup", "customer": customer, "currency": "usd",
            "payment_method_types": ["card"], "metadata": metadata,
            "setup_intent_data": {"metadata": metadata},
            "success_url": success_url, "cancel_url": cancel_url})
    except stripe.StripeError as exc:
        raise PaymentProviderError(f"Stripe refused the card set-up: "
                                   f"{exc.user_message or exc}") from None
    if not session.id or not session.url:
        raise PaymentProviderError("Stripe answered a checkout session without id or url")
    return CheckoutSession(session.id, session.url)


def charge_saved_card(*, attempt_id: int, account_id: int, customer: str, payment_method: str,
                      amount_cents: int, currency: str) -> Charge:
    """One off-session PaymentIntent (``confirm=true, off_session=true``) for an auto-recharge
    attempt, with the attempt's id as Stripe's idempotency key (a retried call charges once)
    and in its metadata (``payment_intent.succeeded`` names the attempt). Never raises for
    Stripe's answers: a decline is a failed :class:`Charge`, an unreachable Stripe a
    ``lost`` one."""
    import stripe  # noqa: PLC0415 - see _client

    try:
        intent = _client().v1.payment_intents.create(params={
            "amount": amount_cents, "currency": currency, "customer": customer,
            "payment_method": payment_method, "confirm": True, "off_session": True,
            "metadata": {"recharge_id": str(attempt_id), "account_id": str(account_id)},
        }, options={"idempotency_key": f"tollway-recharge-{attempt_id}"})
    except stripe.CardError as exc:
        found = (exc.error.payment_intent if exc.error is not None else None)
        pi = found.get("id") if isinstance(found, dict) else getattr(found, "id", None)
        return Charge(pi if isinstance(pi, str) else None, False,
                      f"the card was declined ({exc.code or 'card_error'})")
    except (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError) as exc:
        return Charge(None, False, f"no answer from Stripe ({type(exc).__name__})", lost=True)
    except stripe.StripeError as exc:
        return Charge(None, False, f"Stripe did not charge the card: "
                                   f"{exc.user_message or type(exc).__name__}")
    if intent.status != "succeeded":
        return Charge(intent.id, False, f"the payment is {intent.status} (the card needs the "
                                        "customer's action)")
    return Charge(intent.id, True)


def verify(payload: bytes, signature: str | None) -> dict[str, Any]:
    """The event a webhook delivered, after its signature is checked; InvalidSignature if the
    signature is missing, forged or older than the tolerance."""
    import stripe  # noqa: PLC0415 - see _client

    secret = settings.get("stripe_webhook_secret")
    if not secret:
        raise PaymentsUnavailable("the Stripe webhook is not configured on this server "
                                  "(TOLLWAY_STRIPE_WEBHOOK_SECRET)")
    if not signature:
        raise InvalidSignature("the Stripe-Signature header is missing")
    try:
        stripe.Webhook.construct_event(payload, signature, secret,
                                       tolerance=SIGNATURE_TOLERANCE_S)
    except stripe.SignatureVerificationError:
        raise InvalidSignature("the Stripe-Signature does not match this payload, or is too "
                               "old") from None
    except ValueError:
        raise InvalidSignature("the webhook payload is not valid JSON") from None
    event = json.loads(payload, parse_float=Decimal)  # amounts are integer cents; no floats
    if not isinstance(event, dict) or not isinstance(event.get("id"), str) or not isinstance(
            event.get("type"), str):
        raise InvalidRequest("the webhook payload is not a Stripe event")
    return event
