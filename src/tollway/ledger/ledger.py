"""Double-entry ledger with two-phase holds (TigerBeetle's pending / post / void / expire).

Every movement is one *entry* whose *postings* sum to zero. Ledger accounts are
(account, bucket) pairs: a customer wallet has an ``available`` and a ``held`` bucket; the
system accounts (funding, revenue, write-off, adjustments) use ``available``. The wallet row
stores ``available_nano`` and ``held_nano`` so the guard below is one statement; system
account balances are derived from their postings (they would be hot rows that every request
updates). :func:`verify` recomputes everything from postings.

A key's own limits are guarded the same way, in the one statement that also books the hold on
the key: its total quota, its requests in flight (open holds) and its current one-minute
rate-limit window (requests and tokens, restarted when a later minute begins), so admission
costs no extra round trip; spend caps per calendar period are one guarded upsert more, for
capped keys only (``key_spend``).

The overdraft guard is one conditional statement,
``UPDATE accounts SET available = available - :x WHERE id = :id AND available >= :x``;
zero rows changed means "refuse", and nothing has been written yet. It is atomic on SQLite
(one writer) and on PostgreSQL at READ COMMITTED (the second updater re-checks the WHERE
clause after the first commits).

Every operation takes an idempotency key, stored with a unique index in the same transaction
as the money it moves: a repeat returns the first result and moves nothing; a repeat with
different parameters raises :class:`IdempotencyConflict`.

A wallet with a low-balance threshold is watched by the same statements: those that change its
available balance return it with the threshold, and a crossing queues a ``balance.low`` event
in the same transaction (:func:`_watch`; the transactional outbox).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway import clock
from tollway.errors import (
    HoldClosed,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidRequest,
    LimitExceeded,
    QuotaExceeded,
    RateLimited,
    UnknownAccount,
    UnknownApiKey,
    UnknownHold,
)
from tollway.ledger import periods
from tollway.money import format_usd
from tollway.store import notifications
from tollway.store.prepared import Prepared, upsert
from tollway.store.tables import (
    accounts,
    api_keys,
    entries,
    holds,
    key_spend,
    postings,
    wallet_days,
)

FUNDING = 1
REVENUE = 2
WRITEOFF = 3
ADJUSTMENTS = 4
SYSTEM_ACCOUNTS = {FUNDING: "funding", REVENUE: "revenue", WRITEOFF: "write-off",
                   ADJUSTMENTS: "adjustments"}

AVAILABLE = "available"
HELD = "held"

HoldStatus = Literal["open", "settled", "voided", "expired"]
#: No limit: larger than any count of requests, tokens or open holds.
UNLIMITED = 2**62


@dataclass(frozen=True, slots=True)
class Topup:
    entry_id: int
    account_id: int
    amount_nano: int
    balance_nano: int  # available balance right after this top-up


@dataclass(frozen=True, slots=True)
class Adjustment:
    entry_id: int
    account_id: int
    amount_nano: int  # signed: positive credits the wallet
    balance_nano: int


@dataclass(frozen=True, slots=True)
class Hold:
    id: int
    account_id: int
    key_id: int | None
    amount_nano: int
    expires_at_ms: int
    status: HoldStatus
    created_at_ms: int = 0
    #: The key's rate-limit window after this hold: (start_ms, requests, tokens).
    window: tuple[int, int, int] | None = None


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
class Settlement:
    hold_id: int
    charged_nano: int  # the actual cost, all of it booked as revenue
    from_hold_nano: int
    from_available_nano: int
    shortfall_nano: int  # what neither the hold nor the balance covered: written off
    released_nano: int  # the unused part of the hold, back to available


@dataclass(frozen=True, slots=True)
class Release:
    hold_id: int
    released_nano: int
    status: HoldStatus


# --------------------------------------------------------------------------- statements

_b = sa.bindparam
_FIND_ENTRY = Prepared(
    sa.select(entries.c.id, entries.c.account_id, entries.c.amount_nano, entries.c.hold_id,
              entries.c.balance_after_nano).where(entries.c.idempotency_key == _b("key")))
_INSERT_ENTRY = Prepared(entries.insert().values(
    {c.name: _b(c.name) for c in entries.c if c.name != "id"}).returning(entries.c.id))
#: An entry's postings in one multi-row INSERT (one round trip on PostgreSQL), by row count.
_INSERT_POSTINGS = {
    n: Prepared(postings.insert().values([
        {"entry_id": _b("entry_id"), "account_id": _b(f"a{i}"), "bucket": _b(f"b{i}"),
         "amount_nano": _b(f"x{i}")} for i in range(n)]))
    for n in range(1, 5)}
_ACCOUNT_KIND = Prepared(sa.select(accounts.c.kind).where(accounts.c.id == _b("account_id")))
_AVAILABLE = Prepared(sa.select(accounts.c.available_nano)
                      .where(accounts.c.id == _b("account_id")))
#: Settlement reads the balance it is about to debit: lock the row (PostgreSQL) so that a
#: concurrent hold cannot take the same money between this read and the debit. SQLite (one
#: writer) compiles this without FOR UPDATE.
_AVAILABLE_FOR_UPDATE = Prepared(sa.select(accounts.c.available_nano)
                                 .where(accounts.c.id == _b("account_id")).with_for_update())
#: Statements that change a wallet's available balance return it with the low-balance
#: threshold and its armed flag (see :func:`_watch`): no extra query for the alert.
_WATCHED = (accounts.c.available_nano, accounts.c.low_balance_nano,
            accounts.c.low_balance_armed)
_CREDIT = Prepared(
    accounts.update()
    .where(accounts.c.id == _b("account_id"), accounts.c.kind == "customer",
           accounts.c.available_nano + _b("amount") >= 0)
    .values(available_nano=accounts.c.available_nano + _b("amount"))
    .returning(*_WATCHED))
_RESERVE = Prepared(
    accounts.update()
    .where(accounts.c.id == _b("account_id"), accounts.c.kind == "customer",
           accounts.c.available_nano >= _b("amount"))
    .values(available_nano=accounts.c.available_nano - _b("amount"),
            held_nano=accounts.c.held_nano + _b("amount"))
    .returning(*_WATCHED))
_k = api_keys.c
#: The window restarts when a later minute begins (an instance whose clock lags counts in the
#: current window rather than restart an older one).
_NEW_WINDOW = _k.window_start_ms < _b("window")
#: The key's total quota, its concurrency limit (open holds) and its rate-limit window in one
#: guarded statement, which also returns the key's period caps (checked next) and the window.
_KEY_RESERVE = Prepared(
    api_keys.update()
    .where(_k.id == _b("key_id"),
           sa.or_(_k.quota_nano.is_(None),
                  _k.used_nano + _k.held_nano + _b("amount") <= _k.quota_nano),
           _k.open_holds < _b("max_open"),
           sa.or_(_NEW_WINDOW, sa.and_(_k.window_requests + 1 <= _b("rpm"),
                                       _k.window_tokens + _b("tokens") <= _b("tpm"))))
    .values(held_nano=_k.held_nano + _b("amount"), open_holds=_k.open_holds + 1,
            window_requests=sa.case((_NEW_WINDOW, 1), else_=_k.window_requests + 1),
            window_tokens=sa.case((_NEW_WINDOW, _b("tokens")),
                                  else_=_k.window_tokens + _b("tokens")),
            window_start_ms=sa.case((_NEW_WINDOW, _b("window")), else_=_k.window_start_ms))
    .returning(_k.daily_cap_nano, _k.weekly_cap_nano, _k.monthly_cap_nano,
               _k.window_start_ms, _k.window_requests, _k.window_tokens))
_KEY_STATE = Prepared(
    sa.select(_k.quota_nano, _k.used_nano, _k.held_nano, _k.open_holds, _k.window_start_ms,
              _k.window_requests, _k.window_tokens).where(_k.id == _b("key_id")))
_SPEND_CLOSE = Prepared(
    key_spend.update()
    .where(key_spend.c.key_id == _b("key_id"),
           sa.or_(*(sa.and_(key_spend.c.period == p, key_spend.c.period_start_ms == _b(p))
                    for p in periods.PERIODS)))
    .values(held_nano=key_spend.c.held_nano - _b("held"),
            spent_nano=key_spend.c.spent_nano + _b("charged")))
_INSERT_HOLD = Prepared(holds.insert().values(
    account_id=_b("account_id"), key_id=_b("key_id"), amount_nano=_b("amount"), status="open",
    created_at_ms=_b("at"), expires_at_ms=_b("expires"), cap_periods=_b("cap_periods"))
    .returning(holds.c.id))
_CLOSE_HOLD = Prepared(
    holds.update().where(holds.c.id == _b("hold_id"), holds.c.status == "open")
    .values(status=_b("status"), closed_at_ms=_b("at"), charged_nano=_b("charged"),
            from_available_nano=_b("from_available"), shortfall_nano=_b("shortfall"))
    .returning(holds.c.account_id, holds.c.key_id, holds.c.amount_nano, holds.c.created_at_ms,
               holds.c.cap_periods))
_SET_HOLD_OUTCOME = Prepared(
    holds.update().where(holds.c.id == _b("hold_id"))
    .values(from_available_nano=_b("from_available"), shortfall_nano=_b("shortfall")))
_GET_HOLD = Prepared(
    sa.select(holds.c.id, holds.c.account_id, holds.c.key_id, holds.c.amount_nano,
              holds.c.expires_at_ms, holds.c.status, holds.c.charged_nano,
              holds.c.from_available_nano, holds.c.shortfall_nano, holds.c.created_at_ms)
    .where(holds.c.id == _b("hold_id")))
_SETTLE_ACCOUNT = Prepared(
    accounts.update().where(accounts.c.id == _b("account_id"))
    .values(held_nano=accounts.c.held_nano - _b("held"),
            available_nano=accounts.c.available_nano + _b("delta"),
            used_nano=accounts.c.used_nano + _b("charged"),
            requests=accounts.c.requests + _b("requests"))
    .returning(*_WATCHED))
_SETTLE_KEY = Prepared(
    api_keys.update().where(_k.id == _b("key_id"))
    .values(held_nano=_k.held_nano - _b("held"), used_nano=_k.used_nano + _b("charged"),
            open_holds=_k.open_holds - 1,
            window_tokens=_k.window_tokens + sa.case(
                (_k.window_start_ms == _b("window"), _b("tokens")), else_=0)))

_WALLET_DAY = upsert(wallet_days, ("account_id", "day_ms"),
                     add=("topups_nano", "adjustments_nano", "charges_nano", "written_off_nano"))
DAY_MS = 86_400_000
_EXPIRED = Prepared(
    sa.select(holds.c.id).where(holds.c.status == "open", holds.c.expires_at_ms <= _b("at"))
    .order_by(holds.c.expires_at_ms).limit(_b("limit")))




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


# --------------------------------------------------------------------------- helpers


def _existing_entry(conn: Connection, key: str) -> Any:
    """(id, account_id, amount_nano, hold_id, balance_after_nano) of a used key, or None."""
    return _FIND_ENTRY.one(conn, key=key)


def _conflict(key: str, what: str) -> IdempotencyConflict:
    return IdempotencyConflict(f"idempotency key {key!r} was already used for {what}")


def _post(conn: Connection, *, kind: str, account_id: int, amount_nano: int, key: str,
          lines: list[tuple[int, str, int]], hold_id: int | None = None,
          balance_after_nano: int | None = None, note: str | None = None,
          at_ms: int | None = None) -> int:
    """Write one entry and its postings; the postings must sum to zero."""
    assert sum(amount for _, _, amount in lines) == 0, lines
    entry_id = int(_INSERT_ENTRY.one(
        conn, kind=kind, account_id=account_id, amount_nano=amount_nano, hold_id=hold_id,
        idempotency_key=key, balance_after_nano=balance_after_nano, note=note,
        created_at_ms=clock.now_ms() if at_ms is None else at_ms)[0])
    params: dict[str, Any] = {"entry_id": entry_id}
    moving = [line for line in lines if line[2]]
    for i, (acct, bucket, amount) in enumerate(moving):
        params.update({f"a{i}": acct, f"b{i}": bucket, f"x{i}": amount})
    if moving:
        _INSERT_POSTINGS[len(moving)].execute(conn, params)
    return entry_id


def _wallet_day(conn: Connection, account_id: int, *, topups: int = 0, adjustments: int = 0,
                charges: int = 0, written_off: int = 0, at_ms: int | None = None) -> None:
    """Count a movement of the wallet's total (available + held) in its UTC day."""
    at = clock.now_ms() if at_ms is None else at_ms
    _WALLET_DAY.execute(conn, {"account_id": account_id, "day_ms": at - at % DAY_MS,
                               "topups_nano": topups, "adjustments_nano": adjustments,
                               "charges_nano": charges, "written_off_nano": written_off})


def _watch(conn: Connection, account_id: int, delta_nano: int, row: Any) -> None:
    """Low-balance alert, checked on every change of a wallet's available balance ``row``
    (available after, threshold, armed) by ``delta_nano``.

    A debit that takes an armed wallet from >= threshold to below it queues one
    ``balance.low`` event (in this transaction: the outbox) and disarms; money coming in
    (a top-up, a redemption, a positive adjustment) that brings it back to >= threshold
    re-arms. Released holds do not re-arm, so a wallet hovering at the threshold with large
    worst-case holds is not alerted once per request. Without a threshold this is one test.
    """
    after, threshold, armed = int(row[0]), row[1], row[2]
    if threshold is None:
        return
    if delta_nano < 0 and armed and after < threshold <= after - delta_nano:
        notifications.balance_low(conn, account_id, at_ms=clock.now_ms(), data={
            "available_usd": format_usd(after), "threshold_usd": format_usd(int(threshold))})
    elif delta_nano > 0 and not armed and after >= threshold:
        notifications.set_armed(conn, account_id, True)


def _require_customer(conn: Connection, account_id: int) -> None:
    row = _ACCOUNT_KIND.one(conn, account_id=account_id)
    if row is None or row[0] != "customer":
        raise UnknownAccount(f"no customer account with id {account_id}")


def _available(conn: Connection, account_id: int) -> int:
    return int(_AVAILABLE.one(conn, account_id=account_id)[0])


def _amount(value: object, what: str, *, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{what} must be an integer of nano-USD >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------- credits


def topup(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
          note: str | None = None) -> Topup:
    """Credit a wallet from the funding account."""
    _amount(amount_nano, "a top-up")
    key = f"topup:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        if (row[1], row[2]) != (account_id, amount_nano):
            raise _conflict(idempotency_key, f"a top-up of {format_usd(row[2])} USD to account "
                            f"{row[1]}")
        return Topup(row[0], row[1], row[2], row[4])
    credited = _CREDIT.one(conn, account_id=account_id, amount=amount_nano)
    if credited is None:
        raise UnknownAccount(f"no customer account with id {account_id}")
    balance = int(credited[0])
    _watch(conn, account_id, amount_nano, credited)
    _wallet_day(conn, account_id, topups=amount_nano)
    entry_id = _post(conn, kind="topup", account_id=account_id, amount_nano=amount_nano, key=key,
                     balance_after_nano=balance, note=note,
                     lines=[(FUNDING, AVAILABLE, -amount_nano),
                            (account_id, AVAILABLE, amount_nano)])
    return Topup(entry_id, account_id, amount_nano, balance)


def adjust(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
           note: str | None = None) -> Adjustment:
    """An operator correction: positive credits the wallet, negative debits it (never below
    zero: a debit larger than the available balance is refused)."""
    if not isinstance(amount_nano, int) or isinstance(amount_nano, bool) or amount_nano == 0:
        raise InvalidRequest(f"an adjustment must be a non-zero amount, got {amount_nano!r}")
    key = f"adjust:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        if (row[1], row[2]) != (account_id, amount_nano):
            raise _conflict(idempotency_key, f"an adjustment of {format_usd(row[2])} USD to "
                            f"account {row[1]}")
        return Adjustment(row[0], row[1], row[2], row[4])
    credited = _CREDIT.one(conn, account_id=account_id, amount=amount_nano)
    if credited is None:
        _require_customer(conn, account_id)
        raise InsufficientBalance(f"cannot debit {format_usd(-amount_nano)} USD: account "
                                  f"{account_id} has {format_usd(_available(conn, account_id))}"
                                  " USD available")
    balance = int(credited[0])
    _watch(conn, account_id, amount_nano, credited)
    _wallet_day(conn, account_id, adjustments=amount_nano)
    entry_id = _post(conn, kind="adjust", account_id=account_id, amount_nano=amount_nano, key=key,
                     balance_after_nano=balance, note=note,
                     lines=[(ADJUSTMENTS, AVAILABLE, -amount_nano),
                            (account_id, AVAILABLE, amount_nano)])
    return Adjustment(entry_id, account_id, amount_nano, balance)


# --------------------------------------------------------------------------- holds


def place_hold(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
               ttl_ms: int, key_id: int | None = None,
               rate: RateAdmission = NO_ADMISSION, at_ms: int | None = None) -> Hold:
    """Reserve ``amount_nano`` of the available balance, or raise.

    With ``key_id`` the key's own limits are checked in the same transaction: its used plus
    held amount may not exceed its quota (:class:`QuotaExceeded`); ``rate``: its open holds
    may not reach ``max_open`` and its window may not pass ``rpm`` requests or ``tpm`` tokens
    (:class:`RateLimited` with ``window_state``, the key's window without this request); in
    each period it has a cap for (day, week, month in the billing time zone) the held plus
    spent amount may not exceed the cap (:class:`QuotaExceeded` with ``retry_after_s``). Like
    every ledger function it must run in a transaction (or savepoint) that is rolled back
    when it raises.
    """
    _amount(amount_nano, "a hold")
    key = f"hold:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        hold = _hold(conn, row[3])
        if (hold.account_id, hold.amount_nano, hold.key_id) != (account_id, amount_nano, key_id):
            raise _conflict(idempotency_key, f"hold {hold.id}")
        return hold
    reserved = _RESERVE.one(conn, account_id=account_id, amount=amount_nano)
    if reserved is None:
        _require_customer(conn, account_id)
        raise InsufficientBalance(
            f"this request may cost up to {format_usd(amount_nano)} USD but the account has "
            f"{format_usd(_available(conn, account_id))} USD available")
    at = clock.now_ms() if at_ms is None else at_ms
    cap_periods, window = 0, None
    if key_id is not None:
        cap_periods, window = _reserve_key(conn, key_id, amount_nano, at, rate)
    _watch(conn, account_id, -amount_nano, reserved)
    hold_id = int(_INSERT_HOLD.one(conn, account_id=account_id, key_id=key_id,
                                   amount=amount_nano, at=at, expires=at + ttl_ms,
                                   cap_periods=cap_periods)[0])
    _post(conn, kind="hold", account_id=account_id, amount_nano=amount_nano, key=key,
          hold_id=hold_id, at_ms=at,
          lines=[(account_id, AVAILABLE, -amount_nano), (account_id, HELD, amount_nano)])
    return Hold(hold_id, account_id, key_id, amount_nano, at + ttl_ms, "open", at, window)


def key_window(conn: Connection, key_id: int) -> tuple[int, int, int]:
    """The key's rate-limit window as stored: (start_ms, requests, tokens)."""
    row = _KEY_STATE.one(conn, key_id=key_id)
    return (0, 0, 0) if row is None else (int(row[4]), int(row[5]), int(row[6]))


def _reserve_key(conn: Connection, key_id: int, amount_nano: int, at_ms: int,
                 rate: RateAdmission) -> tuple[int, tuple[int, int, int]]:
    """The key's share of a hold; returns the bits of the cap periods that counted it and
    the key's window after it."""
    row = _KEY_RESERVE.one(conn, key_id=key_id, amount=amount_nano, max_open=rate.max_open,
                           window=rate.window_start_ms, tokens=rate.tokens, rpm=rate.rpm,
                           tpm=rate.tpm)
    if row is None:
        _refuse_key(conn, key_id, amount_nano, rate)
    window = (int(row[3]), int(row[4]), int(row[5]))
    capped = [(p, cap) for p, cap in zip(periods.PERIODS, row[:3], strict=True)
              if cap is not None]
    if not capped:
        return 0, window
    params: dict[str, Any] = {"key_id": key_id, **{f"cap_{p}": 0 for p in periods.PERIODS}}
    for i, (period, cap) in enumerate(capped):
        params.update({f"p{i}": period, f"s{i}": periods.bounds(at_ms, period)[0],
                       f"a{i}": amount_nano, f"cap_{period}": cap})
    counted = {r[0] for r in _SPEND_HOLD[len(capped)].execute(conn, params).fetchall()}
    for period, cap in capped:
        if amount_nano > cap or period not in counted:
            exc = QuotaExceeded(
                f"API key {key_id} has reached its {periods.ADJECTIVE[period]} spending cap "
                f"of {format_usd(cap)} USD",
                retry_after_s=-(-(periods.bounds(at_ms, period)[1] - at_ms) // 1000))
            exc.window_state = (window[0], window[1] - 1, window[2] - rate.tokens)
            raise exc
    return sum(periods.PERIOD_BITS[p] for p, _ in capped), window


def _refuse_key(conn: Connection, key_id: int, amount_nano: int, rate: RateAdmission) -> None:
    """Why the key's guarded statement changed nothing; always raises."""
    row = _KEY_STATE.one(conn, key_id=key_id)
    if row is None:
        raise UnknownApiKey(f"no API key with id {key_id}")
    quota, used, held, in_flight = row[0], int(row[1]), int(row[2]), int(row[3])
    state = (int(row[4]), int(row[5]), int(row[6]))
    if quota is not None and used + held + amount_nano > quota:
        exc: LimitExceeded = QuotaExceeded(f"API key {key_id} has reached its spending quota")
    elif in_flight >= rate.max_open:
        exc = RateLimited(f"API key {key_id} already has {rate.max_open} requests in flight, "
                          "its concurrency limit", retry_after_s=1)
    else:
        exc = RateLimited(f"API key {key_id} has reached its rate limit for this minute")
    exc.window_state = state
    raise exc


def _close_key(conn: Connection, key_id: int, held: int, charged: int, created_at_ms: int,
               cap_periods: int, correction: RateCorrection | None) -> None:
    """A closed hold leaves the key's held amount, in-flight count and cap periods, and its
    window gets the correction of the tokens it counted."""
    _SETTLE_KEY.execute(conn, {"key_id": key_id, "held": held, "charged": charged,
                               "window": correction.window_start_ms if correction else -1,
                               "tokens": correction.tokens if correction else 0})
    if cap_periods:
        _SPEND_CLOSE.execute(conn, {"key_id": key_id, "held": held, "charged": charged, **{
            p: periods.bounds(created_at_ms, p)[0] if cap_periods & periods.PERIOD_BITS[p]
            else -1 for p in periods.PERIODS}})


def settle_hold(conn: Connection, hold_id: int, actual_nano: int, *,
                idempotency_key: str, at_ms: int | None = None,
                correction: RateCorrection | None = None) -> Settlement:
    """Charge the actual cost: from the hold first, then from the available balance; what
    neither covers is written off (the wallet never goes below zero). Releases the rest.
    ``at_ms`` is the time the charge is booked under (its usage record's time);
    ``correction``, the tokens to add to the key's rate-limit window."""
    _amount(actual_nano, "a charge", minimum=0)
    key = f"settle:{idempotency_key}"
    closed = _close(conn, hold_id, "settled", actual_nano)
    if closed is None:  # already closed: a repeat of this settlement, or too late
        if (row := _existing_entry(conn, key)) is not None:
            if (row[3], row[2]) != (hold_id, actual_nano):
                raise _conflict(idempotency_key, f"settling hold {row[3]}")
            return _settlement(conn, hold_id)
        raise HoldClosed(f"hold {hold_id} is already {_hold(conn, hold_id).status}")
    account_id, key_id, held, created_at, cap_periods = closed
    from_hold = min(actual_nano, held)
    released = held - from_hold
    wanted = actual_nano - from_hold
    from_available = shortfall = 0
    if wanted:  # the request cost more than its hold: take the rest from the balance
        balance = int(_AVAILABLE_FOR_UPDATE.one(conn, account_id=account_id)[0])
        from_available = min(wanted, balance)
        shortfall = wanted - from_available
        _SET_HOLD_OUTCOME.execute(conn, {"hold_id": hold_id, "from_available": from_available,
                                         "shortfall": shortfall})
    settled = _SETTLE_ACCOUNT.one(conn, account_id=account_id, held=held,
                                  delta=released - from_available, charged=actual_nano,
                                  requests=1)
    _watch(conn, account_id, min(0, released - from_available), settled)  # a release: no
    _wallet_day(conn, account_id, charges=actual_nano - shortfall,
                written_off=shortfall, at_ms=at_ms)
    if key_id is not None:
        _close_key(conn, key_id, held, actual_nano, created_at, cap_periods, correction)
    _post(conn, kind="settle", account_id=account_id, amount_nano=actual_nano, key=key,
          hold_id=hold_id,
          lines=[(account_id, HELD, -held), (account_id, AVAILABLE, released - from_available),
                 (REVENUE, AVAILABLE, actual_nano), (WRITEOFF, AVAILABLE, -shortfall)])
    return Settlement(hold_id, actual_nano, from_hold, from_available, shortfall, released)


def void_hold(conn: Connection, hold_id: int, *, idempotency_key: str,
              correction: RateCorrection | None = None) -> Release:
    """Release a hold whole: the request was refused or failed upstream; nothing is charged."""
    return _release(conn, hold_id, "voided", f"void:{idempotency_key}", correction)


def expire_holds(conn: Connection, now: int | None = None, *, limit: int = 1000) -> list[Release]:
    """Release holds nobody settled before their deadline (the reaper). Returns what it
    released; call again while it returns ``limit`` items."""
    at = clock.now_ms() if now is None else now
    ids = [int(r[0]) for r in _EXPIRED.execute(conn, {"at": at, "limit": limit}).fetchall()]
    released: list[Release] = []
    for hid in ids:
        try:
            released.append(_release(conn, hid, "expired", f"expire:{hid}"))
        except HoldClosed:  # settled or voided concurrently since the SELECT: nothing written
            continue
    return released


def hold_status(conn: Connection, idempotency_key: str) -> str | None:
    """The status of the hold placed with ``idempotency_key`` (see :func:`place_hold`), or
    None if there is none."""
    row = _existing_entry(conn, f"hold:{idempotency_key}")
    return None if row is None else _hold(conn, row[3]).status


def open_holds(conn: Connection) -> tuple[int, int | None]:
    """(how many holds are open, when the oldest was placed in ms) — for monitoring. Open
    holds are the requests in flight, so this reads few rows (index on status)."""
    row = conn.execute(sa.select(sa.func.count(), sa.func.min(holds.c.created_at_ms))
                       .where(holds.c.status == "open")).one()
    return int(row[0]), None if row[1] is None else int(row[1])


def _release(conn: Connection, hold_id: int, status: HoldStatus, key: str,
             correction: RateCorrection | None = None) -> Release:
    closed = _close(conn, hold_id, status, None)
    if closed is None:  # already closed: a repeat of this release, or too late
        if (row := _existing_entry(conn, key)) is not None:
            if row[3] != hold_id:
                raise _conflict(key, f"releasing hold {row[3]}")
            return Release(hold_id, int(row[2]), status)
        raise HoldClosed(f"hold {hold_id} is already {_hold(conn, hold_id).status}")
    account_id, key_id, held, created_at, cap_periods = closed
    _SETTLE_ACCOUNT.execute(conn, {"account_id": account_id, "held": held, "delta": held,
                                   "charged": 0, "requests": 0}).fetchone()
    if key_id is not None:
        _close_key(conn, key_id, held, 0, created_at, cap_periods, correction)
    _post(conn, kind="void" if status == "voided" else "expire", account_id=account_id,
          amount_nano=held, key=key, hold_id=hold_id,
          lines=[(account_id, HELD, -held), (account_id, AVAILABLE, held)])
    return Release(hold_id, held, status)


def _close(conn: Connection, hold_id: int, status: HoldStatus,
           charged: int | None) -> tuple[int, int | None, int, int, int] | None:
    """Move an open hold to its final status; exactly one closer can win. Returns
    (account_id, key_id, amount_nano, created_at_ms, cap_periods) of the hold, or None if it
    was not open. Closing first
    and looking for an earlier identical operation only when that fails keeps the common path
    one statement shorter."""
    row = _CLOSE_HOLD.one(conn, hold_id=hold_id, status=status, at=clock.now_ms(), charged=charged,
                          from_available=0 if charged is not None else None,
                          shortfall=0 if charged is not None else None)
    return None if row is None else (int(row[0]), row[1], int(row[2]), int(row[3]),
                                     int(row[4]))


def _hold(conn: Connection, hold_id: int) -> Hold:
    row = _GET_HOLD.one(conn, hold_id=hold_id)
    if row is None:
        raise UnknownHold(f"no hold with id {hold_id}")
    return Hold(row[0], row[1], row[2], row[3], row[4], row[5], row[9])


def _settlement(conn: Connection, hold_id: int) -> Settlement:
    row = _GET_HOLD.one(conn, hold_id=hold_id)
    charged, from_available, shortfall = row[6], row[7], row[8]
    from_hold = charged - from_available - shortfall
    return Settlement(hold_id, charged, from_hold, from_available, shortfall, row[3] - from_hold)
