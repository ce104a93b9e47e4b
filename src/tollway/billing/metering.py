"""The request lifecycle in money: reserve (hold) → settle or void, each one writer operation
that also writes the request's usage record and idempotency state in the same transaction.

    reserve  — a replayed Idempotency-Key returns the first response; otherwise place a hold
               for the worst case, or, when the balance cannot cover it, the smaller hold the
               caller's ``shrink`` says the balance affords (max_tokens lowered), else 402.
    settle   — charge the actual cost (ledger), write the usage record, keep the response
               for replays.
    void     — release the hold, write an error record with cost 0, forget the idempotency
               key so the client may retry (as when a dead process's hold expired).
    refuse   — a request a limit refused (429) before anything was held: its error record,
               cost 0 (``reserve`` raised, so its own transaction wrote nothing).

``reserve`` also applies the key's limits (``billing.limits``): its RPM/TPM window, its
concurrency and its spend caps, checked by the ledger in the hold's own statements.

Every charge — a hold's worst case and a settlement's actual cost — is computed by
:func:`rate` from usage, price and ratio (in integers, ``pricing.nano``, proven equal to the
exact ``Decimal`` formula of ``pricing.rating``); the routes only convert their
protocol's usage into its inputs. A settlement is booked with its :class:`Charge`, and its
entry, the wallet's day and the usage record are stamped with one time, ``at_ms``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy.engine import Connection

from tollway.billing import limits as rate_limits
from tollway.billing.limits import NO_LIMITS, Limits, Window
from tollway.errors import (
    IdempotencyConflict,
    InsufficientBalance,
    RequestInProgress,
    TollwayError,
)
from tollway.ledger import guards, ledger
from tollway.ledger.ledger import Hold, Settlement
from tollway.pricing.nano import TokenRater, call_cost_nano
from tollway.pricing.rating import (
    AppliedRatio,
    CallPrice,
    CallUsage,
    Charge,
    Price,
    TokenPrice,
    TokenUsage,
    call_lines,
    token_lines,
)
from tollway.store import accounts as account_store
from tollway.store import responses as response_store
from tollway.store import usage as usage_store

REPLAY_WINDOW_MS = 24 * 3600 * 1000


def rate(usage: TokenUsage | CallUsage, price: Price, ratio: AppliedRatio, *,
         unit_price: Decimal | None = None) -> Charge:
    """The one function that computes a charge: tokens at a token price, or calls at a
    per-call price (``unit_price``: an image size's), × the ratio, rounded once.

    The cost is computed in integer nano-USD (``pricing/nano.py``: a few integer products,
    where the ``Decimal`` formula costs tens of µs per request); the charge's lines, which
    only an explanation reads, are the ``Decimal`` formula's, worked out when read.
    ``tests/pricing/test_rating_nano.py`` proves the cost equal to ``rate_tokens`` /
    ``rate_calls`` for every price, usage and ratio."""
    if isinstance(usage, TokenUsage) and isinstance(price, TokenPrice):
        return Charge(TokenRater.of(price, ratio.value).cost_nano(usage), ratio,
                      functools.partial(token_lines, usage, price))
    if isinstance(usage, CallUsage) and isinstance(price, CallPrice):
        unit = price.per_call if unit_price is None else unit_price
        return Charge(call_cost_nano(usage.calls, unit, ratio.value), ratio,
                      functools.partial(call_lines, usage, unit))
    raise TypeError(f"cannot rate {type(usage).__name__} at a {type(price).__name__}")


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A client's ``Idempotency-Key``, scoped to the API key that sent it."""

    key_id: int
    value: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Replay:
    status: int
    content_type: str
    body: bytes
    cost_nano: int
    request_id: str


@dataclass(frozen=True, slots=True)
class Reservation:
    hold: Hold
    granted: Any = None  # what the shrink callback returned when the hold was lowered
    window: Window | None = None  # the key's rate-limit window after counting this request


def reserve(conn: Connection, *, request_id: str, account_id: int, key_id: int,
            amount_nano: int, ttl_ms: int, client_key: ClientKey | None = None,
            shrink: Callable[[int], tuple[int, Any] | None] | None = None,
            limits: Limits = NO_LIMITS, tokens: int = 0, at_ms: int,
            fresh_request_id: bool = False) -> Reservation | Replay:
    """``tokens``: what the request counts against the key's TPM limit at admission.
    ``fresh_request_id``: ``request_id`` was made by the gateway for this request and this is
    the first run of the operation, so its hold is placed without looking for an earlier one
    (:func:`ledger.place_hold` ``fresh_key``). A client's ``Idempotency-Key`` is looked up
    all the same, in ``request_keys``."""
    now = at_ms
    if client_key is not None:
        row = usage_store.find_request_key(conn, client_key.key_id, client_key.value)
        if row is not None and row.created_at_ms > now - REPLAY_WINDOW_MS:
            request = row.request_id
            if row.fingerprint != client_key.fingerprint:
                raise IdempotencyConflict("this Idempotency-Key was used for a different "
                                          "request in the last 24 hours")
            if row.state == "done":
                return Replay(row.status, row.content_type, bytes(row.body or b""),
                              row.cost_nano, request)
            # Still "in progress" although its hold expired: the process serving it died, and
            # the reaper released the hold (a late settlement of an expired hold is refused).
            # Nothing was charged, so this retry takes the key over.
            if ledger.hold_status(conn, request) != "expired":
                raise RequestInProgress("a request with this Idempotency-Key is still in "
                                        "progress")
        usage_store.claim_request_key(conn, key_id=client_key.key_id,
                                      idempotency_key=client_key.value, request_id=request_id,
                                      fingerprint=client_key.fingerprint, at_ms=now)
    try:
        rate = rate_limits.admission(limits, tokens, now)
        try:
            hold = ledger.place_hold(conn, account_id, amount_nano, idempotency_key=request_id,
                                     ttl_ms=ttl_ms, key_id=key_id, rate=rate, at_ms=now,
                                     fresh_key=fresh_request_id)
            return Reservation(hold, window=rate_limits.window(limits, now, hold.window))
        except InsufficientBalance:
            if shrink is None:
                raise
            available = account_store.get_account(conn, account_id).available_nano
            smaller = shrink(available)
            if smaller is None:
                raise
            amount, granted = smaller
            hold = ledger.place_hold(conn, account_id, amount, idempotency_key=request_id,
                                     ttl_ms=ttl_ms, key_id=key_id, rate=rate, at_ms=now,
                                     fresh_key=fresh_request_id)
            return Reservation(hold, granted,
                               rate_limits.window(limits, now, hold.window))
    except TollwayError as exc:  # refused (402, 429): nothing was counted
        if limits.windowed:
            state = (exc.window if isinstance(exc, guards.KeyQuotaExceeded | guards.KeyRateLimited)
                     else guards.key_window(conn, key_id))
            rate_limits.explain(exc, limits, tokens, now, state)
        raise


def settle(conn: Connection, *, hold_id: int, charge: Charge, record: dict[str, Any],
           at_ms: int, client_key: ClientKey | None = None,
           response: tuple[int, str, bytes | None] | None = None, window: Window | None = None,
           counted_tokens: int = 0, remember: tuple[str, ...] = ()) -> Settlement:
    """Book ``charge`` (from :func:`rate`) at ``at_ms``: the ledger's entry, the wallet's day
    and the usage record carry that one time. ``window``/``counted_tokens``: the request's
    rate-limit window and what it counted there at admission, replaced by the record's actual
    input + output tokens. ``remember``: the Responses (and conversation) ids this answer
    created, kept with the account and the record's input + output tokens (the history a
    request continuing them carries)."""
    cost_nano = charge.cost_nano_usd
    correction = rate_limits.correction(
        window, counted=counted_tokens,
        actual=record["input_tokens"] + record["output_tokens"])
    settlement = ledger.settle_hold(conn, hold_id, cost_nano,
                                    idempotency_key=record["request_id"], at_ms=at_ms,
                                    correction=correction)
    usage_store.insert_usage(conn, {**record, "created_at_ms": at_ms, "hold_id": hold_id,
                                    "cost_nano": cost_nano})
    if remember:
        response_store.remember(conn, remember, account_id=record["account_id"],
                                context_tokens=record["input_tokens"] + record["output_tokens"],
                                at_ms=at_ms)
    if client_key is not None and response is not None:
        status, content_type, body = response
        usage_store.complete_request_key(conn, key_id=client_key.key_id,
                                         idempotency_key=client_key.value, status=status,
                                         content_type=content_type, body=body,
                                         cost_nano=cost_nano)
    return settlement


def void(conn: Connection, *, hold_id: int, record: dict[str, Any], at_ms: int,
         client_key: ClientKey | None = None, window: Window | None = None,
         counted_tokens: int = 0) -> None:
    ledger.void_hold(conn, hold_id, at_ms=at_ms,
                     correction=rate_limits.correction(window, counted=counted_tokens,
                                                       actual=0))
    usage_store.insert_usage(conn, {**record, "hold_id": hold_id, "cost_nano": 0})
    if client_key is not None:
        usage_store.release_request_key(conn, key_id=client_key.key_id,
                                        idempotency_key=client_key.value)


def refuse(conn: Connection, *, record: dict[str, Any]) -> None:
    usage_store.insert_usage(conn, {**record, "hold_id": None, "cost_nano": 0})
