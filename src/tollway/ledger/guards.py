"""A key's own limits, guarded in the hold's own transaction: its total quota, its requests in
flight (open holds), its current one-minute rate-limit window (requests and tokens, restarted
when a later minute begins) and its spend caps per calendar period.

The quota, concurrency and window are one guarded ``UPDATE`` of the key's row, the same
statement that books the hold's share on the key, so admission costs no extra round trip;
spend caps are one guarded upsert more, for capped keys only (``key_spend``). Zero rows
changed means "refuse": :func:`refuse` reads the key once to say why. These are the ledger's
statements (they run beside the wallet's, and roll back with it), kept apart from the money.

The same statement refuses a key that is revoked or expired, and applies the key row's own
rate limits and concurrency (lowering what the caller passes), so a change made through the
CLI, the admin API or the console binds on the very next request on every worker and
instance, whatever a key cache still holds, at no extra statement (issue 15).

The window travels as a :class:`KeyWindow`; a refusal carries the key's window without the
refused request (:class:`KeyQuotaExceeded`, :class:`KeyRateLimited`), for its rate-limit
headers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.errors import (
    ExpiredApiKey,
    LimitExceeded,
    QuotaExceeded,
    RateLimited,
    RevokedApiKey,
    UnknownApiKey,
)
from tollway.ledger import periods
from tollway.money import format_usd
from tollway.store.prepared import Prepared
from tollway.store.tables import api_keys, key_spend

#: No limit: larger than any count of requests, tokens or open holds.
UNLIMITED = 2**62


@dataclass(frozen=True, slots=True)
class KeyWindow:
    """A key's rate-limit window as stored: the minute it started (ms), its requests and its
    tokens."""

    start_ms: int = 0
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class RateAdmission:
    """What a request counts in its key's window: the minute it starts in (ms), its tokens,
    and the limits the window may not pass (:data:`UNLIMITED` for none)."""

    window_start_ms: int = 0
    tokens: int = 0
    rpm: int = UNLIMITED
    tpm: int = UNLIMITED
    max_open: int = UNLIMITED


NO_ADMISSION = RateAdmission()


@dataclass(frozen=True, slots=True)
class RateCorrection:
    """At settlement or void: the tokens to add to the window the request was admitted in
    (nothing if that window has ended)."""

    window_start_ms: int
    tokens: int


@dataclass(frozen=True, slots=True)
class KeyShare:
    """What a hold booked on its key: the cap periods that counted it (bits of
    :data:`periods.PERIOD_BITS`) and the key's window after it."""

    cap_periods: int
    window: KeyWindow


class KeyQuotaExceeded(QuotaExceeded):
    """The key's quota or a spend cap refused the hold; ``window``: the key's window without
    this request."""

    def __init__(self, message: str, *, window: KeyWindow,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.window = window


class KeyRateLimited(RateLimited):
    """The key's concurrency or rate-limit window refused the hold; ``window``: the key's
    window without this request."""

    def __init__(self, message: str, *, window: KeyWindow,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.window = window


KeyRefusal = KeyQuotaExceeded | KeyRateLimited

_b = sa.bindparam
_k = api_keys.c
#: The window restarts when a later minute begins (an instance whose clock lags counts in the
#: current window rather than restart an older one).
_NEW_WINDOW = _k.window_start_ms < _b("window")
#: The key's total quota, its concurrency limit (open holds) and its rate-limit window in one
#: guarded statement, which also returns the key's period caps (checked next) and the window.
def _lowest(column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[Any]:
    """The limit ``name`` the caller passes, lowered by the key row's own (NULL: none), so a
    key limit lowered a moment ago binds on the next request, whatever a cache still holds."""
    return sa.case((column < _b(name), column), else_=_b(name))


#: Usable: not revoked, not expired at the hold's time. Read in the hold's own statement, so a
#: key revoked or expired a moment ago is refused by every worker and instance at once.
_USABLE = (_k.revoked_at_ms.is_(None),
           sa.or_(_k.expires_at_ms.is_(None), _k.expires_at_ms > _b("at")))
#: (Also a part of the hold's one statement on PostgreSQL: ``ledger._RESERVE_ALL``.)
KEY_RESERVE = (
    api_keys.update()
    .where(_k.id == _b("key_id"), *_USABLE,
           sa.or_(_k.quota_nano.is_(None),
                  _k.used_nano + _k.held_nano + _b("amount") <= _k.quota_nano),
           _k.open_holds < _lowest(_k.concurrency, "max_open"),
           sa.or_(_NEW_WINDOW,
                  sa.and_(_k.window_requests + 1 <= _lowest(_k.rpm, "rpm"),
                          _k.window_tokens + _b("tokens") <= _lowest(_k.tpm, "tpm"))))
    .values(held_nano=_k.held_nano + _b("amount"), open_holds=_k.open_holds + 1,
            window_requests=sa.case((_NEW_WINDOW, 1), else_=_k.window_requests + 1),
            window_tokens=sa.case((_NEW_WINDOW, _b("tokens")),
                                  else_=_k.window_tokens + _b("tokens")),
            window_start_ms=sa.case((_NEW_WINDOW, _b("window")), else_=_k.window_start_ms))
    .returning(_k.daily_cap_nano, _k.weekly_cap_nano, _k.monthly_cap_nano,
               _k.window_start_ms, _k.window_requests, _k.window_tokens))
_KEY_RESERVE = Prepared(KEY_RESERVE)
_KEY_STATE = Prepared(
    sa.select(_k.quota_nano, _k.used_nano, _k.held_nano, _k.open_holds, _k.window_start_ms,
              _k.window_requests, _k.window_tokens, _k.prefix, _k.revoked_at_ms,
              _k.expires_at_ms, _k.concurrency).where(_k.id == _b("key_id")))
_SPEND_CLOSE = Prepared(
    key_spend.update()
    .where(key_spend.c.key_id == _b("key_id"),
           sa.or_(*(sa.and_(key_spend.c.period == p, key_spend.c.period_start_ms == _b(p))
                    for p in periods.PERIODS)))
    .values(held_nano=key_spend.c.held_nano - _b("held"),
            spent_nano=key_spend.c.spent_nano + _b("charged")))
_SETTLE_KEY = Prepared(
    api_keys.update().where(_k.id == _b("key_id"))
    .values(held_nano=_k.held_nano - _b("held"), used_nano=_k.used_nano + _b("charged"),
            open_holds=_k.open_holds - 1,
            window_tokens=_k.window_tokens + sa.case(
                (_k.window_start_ms == _b("window"), _b("tokens")), else_=0)))
#: The cap column of each period, as the key's guarded statement returns it.
_CAP_COLUMN = {"day": "daily_cap_nano", "week": "weekly_cap_nano", "month": "monthly_cap_nano"}


def _spend_hold(dialect: str, rows: int) -> sa.ClauseElement:
    from sqlalchemy.dialects import postgresql, sqlite

    insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
    stmt = insert(key_spend).values([
        {"key_id": _b("key_id"), "period": _b(f"p{i}"), "period_start_ms": _b(f"s{i}"),
         "spent_nano": 0, "held_nano": _b(f"a{i}")} for i in range(rows)])
    cap = sa.case(*((key_spend.c.period == p, _b(f"cap_{p}")) for p in periods.PERIODS))
    return stmt.on_conflict_do_update(
        index_elements=["key_id", "period", "period_start_ms"],
        set_={"held_nano": key_spend.c.held_nano + stmt.excluded.held_nano},
        where=(key_spend.c.spent_nano + key_spend.c.held_nano + stmt.excluded.held_nano
               <= cap),
    ).returning(key_spend.c.period)


#: The key's period caps, guarded like the balance: held + spent + this hold may not pass a
#: cap. One multi-row upsert for the capped periods; a period whose guard fails returns no row.
#: The insert (first hold of a period) is guarded by the caller (amount <= cap).
_SPEND_HOLD = {n: Prepared(functools.partial(_spend_hold, rows=n)) for n in (1, 2, 3)}


def key_window(conn: Connection, key_id: int) -> KeyWindow:
    """The key's rate-limit window as stored."""
    row = _KEY_STATE.row(conn, key_id=key_id)
    return KeyWindow() if row is None else _window(row)


def _window(row: Any) -> KeyWindow:
    return KeyWindow(int(row.window_start_ms), int(row.window_requests),
                     int(row.window_tokens))


def reserve(conn: Connection, key_id: int, amount_nano: int, at_ms: int,
            rate: RateAdmission) -> KeyShare:
    """The key's share of a hold placed at ``at_ms``, or raise (:func:`refuse`)."""
    row = _KEY_RESERVE.row(conn, **reserve_params(key_id, amount_nano, at_ms, rate))
    return admitted(conn, row, key_id, amount_nano, at_ms, rate)


def reserve_params(key_id: int | None, amount_nano: int, at_ms: int, rate: RateAdmission
                   ) -> dict[str, Any]:
    """The bind parameters of :data:`KEY_RESERVE`."""
    return {"key_id": key_id, "amount": amount_nano, "max_open": rate.max_open,
            "window": rate.window_start_ms, "tokens": rate.tokens, "rpm": rate.rpm,
            "tpm": rate.tpm, "at": at_ms}


def admitted(conn: Connection, row: Any, key_id: int, amount_nano: int, at_ms: int,
             rate: RateAdmission) -> KeyShare:
    """The key's share after :data:`KEY_RESERVE` returned ``row`` (None: it refused, and
    this raises): its spend caps are held next, if it has any."""
    if row is None:
        refuse(conn, key_id, amount_nano, rate, at_ms)
    window = _window(row)
    capped = [(p, getattr(row, _CAP_COLUMN[p])) for p in periods.PERIODS]
    capped = [(p, cap) for p, cap in capped if cap is not None]
    if not capped:
        return KeyShare(0, window)
    params: dict[str, Any] = {"key_id": key_id, **{f"cap_{p}": 0 for p in periods.PERIODS}}
    for i, (period, cap) in enumerate(capped):
        params.update({f"p{i}": period, f"s{i}": periods.bounds(at_ms, period)[0],
                       f"a{i}": amount_nano, f"cap_{period}": cap})
    counted = {r[0] for r in _SPEND_HOLD[len(capped)].execute(conn, params).fetchall()}
    for period, cap in capped:
        if amount_nano > cap or period not in counted:
            raise KeyQuotaExceeded(
                f"API key {key_id} has reached its {periods.ADJECTIVE[period]} spending cap "
                f"of {format_usd(cap)} USD",
                retry_after_s=-(-(periods.bounds(at_ms, period)[1] - at_ms) // 1000),
                window=KeyWindow(window.start_ms, window.requests - 1,
                                 window.tokens - rate.tokens))
    return KeyShare(sum(periods.PERIOD_BITS[p] for p, _ in capped), window)


def check_usable(conn: Connection, key_id: int, at_ms: int) -> None:
    """Raise if the key is revoked or expired at ``at_ms`` (read on refusal paths only)."""
    _unusable(_KEY_STATE.row(conn, key_id=key_id), key_id, at_ms)


def _unusable(row: Any, key_id: int, at_ms: int) -> None:
    if row is None:
        raise UnknownApiKey(f"no API key with id {key_id}")
    if row.revoked_at_ms is not None:
        raise RevokedApiKey(f"API key {row.prefix}… was revoked")
    if row.expires_at_ms is not None and row.expires_at_ms <= at_ms:
        raise ExpiredApiKey(f"API key {row.prefix}… has expired")


def refuse(conn: Connection, key_id: int, amount_nano: int, rate: RateAdmission,
           at_ms: int) -> None:
    """Why the key's guarded statement changed nothing; always raises."""
    row = _KEY_STATE.row(conn, key_id=key_id)
    _unusable(row, key_id, at_ms)
    max_open = min(rate.max_open, rate.max_open if row.concurrency is None
                   else int(row.concurrency))
    window = _window(row)
    exc: LimitExceeded
    if row.quota_nano is not None and (int(row.used_nano) + int(row.held_nano) + amount_nano
                                       > row.quota_nano):
        exc = KeyQuotaExceeded(f"API key {key_id} has reached its spending quota",
                               window=window)
    elif int(row.open_holds) >= max_open:
        exc = KeyRateLimited(f"API key {key_id} already has {max_open} requests in "
                             "flight, its concurrency limit", retry_after_s=1, window=window)
    else:
        exc = KeyRateLimited(f"API key {key_id} has reached its rate limit for this minute",
                             window=window)
    raise exc


def close(conn: Connection, key_id: int, held: int, charged: int, created_at_ms: int,
          cap_periods: int, correction: RateCorrection | None) -> None:
    """A closed hold leaves the key's held amount, in-flight count and cap periods, and its
    window gets the correction of the tokens it counted."""
    _SETTLE_KEY.execute(conn, {"key_id": key_id, "held": held, "charged": charged,
                               "window": correction.window_start_ms if correction else -1,
                               "tokens": correction.tokens if correction else 0})
    if cap_periods:
        close_periods(conn, key_id, held, charged, created_at_ms, cap_periods)


def close_periods(conn: Connection, key_id: int, held: int, charged: int, created_at_ms: int,
                  cap_periods: int) -> None:
    """A closed hold leaves the cap periods that counted it (``cap_periods``, not 0)."""
    _SPEND_CLOSE.execute(conn, {"key_id": key_id, "held": held, "charged": charged, **{
        p: periods.bounds(created_at_ms, p)[0] if cap_periods & periods.PERIOD_BITS[p]
        else -1 for p in periods.PERIODS}})
