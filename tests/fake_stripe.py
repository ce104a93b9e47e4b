"""A small fake of the few Stripe endpoints Tollway uses, on 127.0.0.1, and real webhook
signatures.

- ``POST /v1/checkout/sessions`` (form-encoded, as the official library sends it) makes a
  session and remembers it with the request's Idempotency-Key; ``GET
  /v1/checkout/sessions/{id}`` reads it back.
- ``GET /pay/{id}`` is the hosted payment page (a "Pay" button); ``POST /pay/{id}`` marks the
  session paid, sends ``checkout.session.completed`` to ``webhook_url`` signed with the
  endpoint secret, and redirects to the session's ``success_url`` (as Stripe does).
- ``POST /v1/customers`` makes a customer (auto-recharge's), once per Idempotency-Key; a
  session in ``setup`` mode (saving a card) has no line items and names its customer.
- ``POST /v1/payment_intents`` charges a saved card (off-session): a PaymentIntent that
  succeeded, kept with its Idempotency-Key, and a repeated key gets the first answer back
  with no new charge, as Stripe does. ``lose_answers = N`` charges, then drops the
  connection instead of answering, N times (the library's own retries count).
- ``fail_next`` makes the next API call answer a Stripe error.

:func:`signature` computes a ``Stripe-Signature`` header exactly as Stripe does (HMAC-SHA256
of ``"{t}.{payload}"`` under the secret), so tests exercise the library's real verification.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import threading
import time
from typing import Any

import httpx
from aiohttp import web

WEBHOOK_SECRET = "whsec_test_tollway_secret"
SECRET_KEY = "sk_test_tollway_fake"
_ids = itertools.count(1)


def stripe_env(fake: FakeStripe) -> dict[str, str]:
    """The settings of a gateway whose card top-ups go to ``fake``."""
    return {"TOLLWAY_STRIPE_SECRET_KEY": SECRET_KEY,
            "TOLLWAY_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "TOLLWAY_STRIPE_API_BASE": fake.base}


def signature(payload: bytes, secret: str = WEBHOOK_SECRET, *, at: int | None = None) -> str:
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def event(type_: str, obj: dict[str, Any], *, event_id: str | None = None) -> bytes:
    return json.dumps({"id": event_id or f"evt_test_{next(_ids)}", "object": "event",
                       "type": type_, "api_version": "2024-06-20", "created": int(time.time()),
                       "livemode": False, "data": {"object": obj}}).encode()


def _unflatten(form: Any) -> dict[str, Any]:
    """``line_items[0][price_data][unit_amount]=2000`` → nested dicts (lists as dicts)."""
    out: dict[str, Any] = {}
    for key, value in form.items():
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


class FakeStripe:
    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.customers: dict[str, str] = {}  # Idempotency-Key -> customer id
        self.intents: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> PaymentIntent
        self.lose_answers = 0
        self.requests: list[tuple[str, dict[str, Any], str | None]] = []
        self.webhook_url = ""
        self.fail_next = False
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeStripe:
        loop = asyncio.new_event_loop()
        self._loop = loop
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            app = web.Application()
            app.router.add_post("/v1/checkout/sessions", self._create)
            app.router.add_post("/v1/customers", self._customer)
            app.router.add_post("/v1/payment_intents", self._intent)
            app.router.add_get("/v1/checkout/sessions/{id}", self._get)
            app.router.add_get("/pay/{id}", self._page)
            app.router.add_post("/pay/{id}", self._pay)
            runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self.port = int(runner.addresses[0][1])
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-stripe", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # ------------------------------------------------------------------ API

    async def _create(self, request: web.Request) -> web.Response:
        params = _unflatten(await request.post())
        idem = request.headers.get("Idempotency-Key")
        self.requests.append(("create", params, idem))
        if request.headers.get("Authorization") != f"Bearer {SECRET_KEY}":
            return web.json_response({"error": {"type": "invalid_request_error",
                                                "message": "Invalid API Key provided"}},
                                     status=401)
        if self.fail_next:
            self.fail_next = False
            return web.json_response({"error": {"type": "invalid_request_error",
                                                "message": "the fake refuses"}}, status=400)
        for session in self.sessions.values():
            if session["_idempotency_key"] == idem:
                return web.json_response(_public(session))
        sid = f"cs_test_{next(_ids):06d}{int(time.time() * 1000) % 10**6:06d}"
        item = params["line_items"]["0"] if params["mode"] == "payment" else {
            "price_data": {"unit_amount": 0, "currency": params["currency"]}, "quantity": 1}
        session = {
            "id": sid, "object": "checkout.session", "mode": params["mode"],
            "url": f"{self.base}/pay/{sid}", "status": "open", "payment_status": "unpaid",
            "amount_total": int(item["price_data"]["unit_amount"]) * int(item["quantity"]),
            "currency": item["price_data"]["currency"], "customer": params.get("customer"),
            "client_reference_id": params.get("client_reference_id"),
            "metadata": params.get("metadata", {}), "payment_intent": None,
            "success_url": params["success_url"], "cancel_url": params["cancel_url"],
            "_idempotency_key": idem,
        }
        self.sessions[sid] = session
        return web.json_response(_public(session))

    async def _customer(self, request: web.Request) -> web.Response:
        params = _unflatten(await request.post())
        idem = request.headers.get("Idempotency-Key") or f"none-{next(_ids)}"
        self.requests.append(("customer", params, idem))
        customer = self.customers.setdefault(idem, f"cus_test_{next(_ids):06d}")
        return web.json_response({"id": customer, "object": "customer",
                                  "metadata": params.get("metadata", {})})

    async def _intent(self, request: web.Request) -> web.Response:
        params = _unflatten(await request.post())
        idem = request.headers.get("Idempotency-Key") or f"none-{next(_ids)}"
        self.requests.append(("payment_intent", params, idem))
        intent = self.intents.get(idem)
        if intent is None:  # a new charge of the card
            intent = self.intents[idem] = {
                "id": f"pi_test_{next(_ids):06d}", "object": "payment_intent",
                "amount": int(params["amount"]), "currency": params["currency"],
                "customer": params["customer"], "payment_method": params["payment_method"],
                "status": "succeeded", "metadata": params.get("metadata", {})}
        if self.lose_answers:
            self.lose_answers -= 1
            assert request.transport is not None
            request.transport.close()  # charged, but the answer never arrives
        return web.json_response(intent)

    async def _get(self, request: web.Request) -> web.Response:
        session = self.sessions.get(request.match_info["id"])
        if session is None:
            return web.json_response({"error": {"type": "invalid_request_error",
                                                "message": "No such checkout.session"}},
                                     status=404)
        return web.json_response(_public(session))

    # ------------------------------------------------------------------ hosted page

    async def _page(self, request: web.Request) -> web.Response:
        session = self.sessions[request.match_info["id"]]
        amount = session["amount_total"]
        return web.Response(content_type="text/html", text=(
            "<!doctype html><title>Fake Stripe Checkout</title>"
            f"<h1>Pay ${amount // 100}.{amount % 100:02d}</h1>"
            f"<form method=post><button id=pay>Pay</button></form>"
            f"<a id=cancel href=\"{session['cancel_url']}\">Back</a>"))

    async def _pay(self, request: web.Request) -> web.Response:
        session = self.sessions[request.match_info["id"]]
        payload = self.complete(session["id"])
        async with httpx.AsyncClient(timeout=20) as client:
            answer = await client.post(self.webhook_url, content=payload, headers={
                "Stripe-Signature": signature(payload), "Content-Type": "application/json"})
        if answer.status_code != 200:
            return web.Response(status=500, text=f"webhook failed: {answer.text}")
        target = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"])
        raise web.HTTPSeeOther(target)

    def complete(self, sid: str) -> bytes:
        """Mark a session paid; the signed-to-be ``checkout.session.completed`` payload."""
        session = self.sessions[sid]
        session.update(status="complete", payment_status="paid",
                       payment_intent=f"pi_test_{sid[8:]}")
        return event("checkout.session.completed", _public(session))


def _public(session: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in session.items() if not k.startswith("_")}
