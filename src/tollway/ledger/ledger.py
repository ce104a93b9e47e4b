"""Double-entry ledger with two-phase holds (TigerBeetle's pending / post / void / expire).

Every movement of money is one *entry* whose *postings* sum to zero, between ledger accounts
(account, bucket): the customer wallets and the system accounts (funding, revenue, write-off,
adjustments), all in the ``available`` bucket. The wallet row stores ``available_nano`` and
``held_nano`` so the guard below is one statement; system account balances are derived from
their postings (they would be hot rows that every request updates).

A hold is a reservation, not a movement: it lives on its ``holds`` row and in the wallet's
``held_nano`` only, and books nothing in the ledger. The settlement books ONE entry, the
charge (wallet → revenue, the part neither the hold nor the balance covered from write-off);
a void or an expiry releases ``held_nano`` and closes the hold, and books nothing. So a
wallet's postings sum to its whole balance (available + held), and its held amount equals its
open holds: :func:`verify` checks both. (Before migration 0015 a hold was booked available →
held and reversed at its close; that migration moved the reservations still open off the
ledger.)

The overdraft guard is one conditional statement,
``UPDATE accounts SET available = available - :x WHERE id = :id AND available >= :x``;
zero rows changed means "refuse", and nothing has been written yet. It is atomic on SQLite
(one writer) and on PostgreSQL at READ COMMITTED (the second updater re-checks the WHERE
clause after the first commits).

Every operation takes an idempotency key, stored with a unique index in the same transaction
as the money it moves (an entry's, or the hold's own): a repeat returns the first result and
moves nothing; a repeat with different parameters raises :class:`IdempotencyConflict`. A hold
is its own key for its release: voiding a voided hold again returns the same release. Every
operation that books money takes its time, ``at_ms``: the entry, the wallet's day and the
hold are stamped by one clock.

Beside the money, in the same transactions: a key's own limits (:mod:`guards`), the wallet's
daily rollups (:mod:`wallet_days`) and the low-balance outbox (:mod:`low_balance`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ClauseElement

from tollway import clock
from tollway.errors import (
    AccountDisabled,
    HoldClosed,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidRequest,
    UnknownAccount,
    UnknownHold,
)
from tollway.ledger import guards, wallet_days
from tollway.ledger.guards import NO_ADMISSION, KeyWindow, RateAdmission, RateCorrection
from tollway.ledger.low_balance import WATCHED, watch
from tollway.money import format_usd
from tollway.store.prepared import Prepared
from tollway.store.tables import accounts, entries, holds, postings

FUNDING = 1
REVENUE = 2
WRITEOFF = 3
ADJUSTMENTS = 4
SYSTEM_ACCOUNTS = {FUNDING: "funding", REVENUE: "revenue", WRITEOFF: "write-off",
                   ADJUSTMENTS: "adjustments"}

AVAILABLE = "available"
#: The bucket holds were booked in before migration 0015; every wallet's now sums to zero.
HELD = "held"

HoldStatus = Literal["open", "settled", "voided", "expired"]


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
    #: The key's rate-limit window after this hold (a hold placed with a key).
    window: KeyWindow | None = None


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


@dataclass(frozen=True, slots=True)
class _Closed:
    """An open hold just closed (what :data:`_CLOSE_HOLD` returns)."""

    account_id: int
    key_id: int | None
    amount_nano: int
    created_at_ms: int
    cap_periods: int


# --------------------------------------------------------------------------- statements

#: Where a hold, and a settlement its hold covers, are one statement each (data-modifying
#: CTEs: :func:`_reserve_all`, :data:`_SETTLE_COVERED`); elsewhere, one statement a step.
ONE_STATEMENT = frozenset({"postgresql"})

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
_ACCOUNT_KIND = Prepared(sa.select(accounts.c.kind, accounts.c.disabled_at_ms)
                         .where(accounts.c.id == _b("account_id")))
_AVAILABLE = Prepared(sa.select(accounts.c.available_nano)
                      .where(accounts.c.id == _b("account_id")))
#: Settlement reads the balance it is about to debit: lock the row (PostgreSQL) so that a
#: concurrent hold cannot take the same money between this read and the debit. SQLite (one
#: writer) compiles this without FOR UPDATE.
_AVAILABLE_FOR_UPDATE = Prepared(sa.select(accounts.c.available_nano)
                                 .where(accounts.c.id == _b("account_id")).with_for_update())
#: Statements that change a wallet's available balance return it with the low-balance
#: threshold and its armed flag (see :func:`low_balance.watch`): no extra query for the alert.
_CREDIT = Prepared(
    accounts.update()
    .where(accounts.c.id == _b("account_id"), accounts.c.kind == "customer",
           accounts.c.available_nano + _b("amount") >= 0)
    .values(available_nano=accounts.c.available_nano + _b("amount"))
    .returning(*WATCHED))
#: A hold: the balance covers it and the account is not disabled (checked here, in the hold's
#: own statement, so disabling an account refuses its next request everywhere at once).
_RESERVE_WALLET = (
    accounts.update()
    .where(accounts.c.id == _b("account_id"), accounts.c.kind == "customer",
           accounts.c.disabled_at_ms.is_(None), accounts.c.available_nano >= _b("amount"))
    .values(available_nano=accounts.c.available_nano - _b("amount"),
            held_nano=accounts.c.held_nano + _b("amount"))
    .returning(*WATCHED))
_RESERVE = Prepared(_RESERVE_WALLET)
_INSERT_HOLD = Prepared(holds.insert().values(
    account_id=_b("account_id"), key_id=_b("key_id"), amount_nano=_b("amount"), status="open",
    created_at_ms=_b("at"), expires_at_ms=_b("expires"), cap_periods=_b("cap_periods"),
    idempotency_key=_b("key"))
    .returning(holds.c.id))


def _reserve_all(dialect: str) -> ClauseElement:
    """PostgreSQL: a hold in ONE statement (data-modifying CTEs) instead of three, each a
    wait for its result: the wallet's guarded UPDATE (:data:`_RESERVE_WALLET`), then the
    key's (:data:`guards.KEY_RESERVE`, only once the wallet's changed a row: the wallet is
    locked first, as everywhere), then the hold's row, if both admitted it and the key has no
    spend cap (a capped key's caps are held first, in Python: the hold is inserted after).
    Returns one row: the wallet's :data:`WATCHED` columns, the key's (NULL: it refused, or no
    key) and ``hold_id`` (NULL: not inserted); no row when the wallet refused. Whatever was
    written before a refusal is rolled back with the operation, as on the long path."""
    wallet = _RESERVE_WALLET.cte("wallet")
    key = guards.KEY_RESERVE.where(sa.exists(wallet.select())).cte("key")
    uncapped = sa.select(key.c.window_start_ms).where(
        key.c.daily_cap_nano.is_(None), key.c.weekly_cap_nano.is_(None),
        key.c.monthly_cap_nano.is_(None))
    hold = holds.insert().from_select(
        ["account_id", "key_id", "amount_nano", "status", "created_at_ms", "expires_at_ms",
         "cap_periods", "idempotency_key"],
        sa.select(_b("account_id", type_=sa.BigInteger), _b("key_id", type_=sa.BigInteger),
                  _b("amount", type_=sa.BigInteger), sa.literal_column("'open'"),
                  _b("at", type_=sa.BigInteger), _b("expires", type_=sa.BigInteger),
                  sa.literal_column("0"), _b("key", type_=sa.String))
        .where(sa.exists(wallet.select()),
               sa.or_(_b("key_id", type_=sa.BigInteger).is_(None), sa.exists(uncapped))),
    ).returning(holds.c.id.label("hold_id")).cte("hold")
    return (sa.select(*wallet.c, *key.c, hold.c.hold_id)
            .select_from(wallet.outerjoin(key, sa.true()).outerjoin(hold, sa.true())))


_RESERVE_ALL = Prepared(_reserve_all)
_CLOSE_HOLD = Prepared(
    holds.update().where(holds.c.id == _b("hold_id"), holds.c.status == "open")
    .values(status=_b("status"), closed_at_ms=_b("at"), charged_nano=_b("charged"),
            from_available_nano=_b("from_available"), shortfall_nano=_b("shortfall"))
    .returning(holds.c.account_id, holds.c.key_id, holds.c.amount_nano, holds.c.created_at_ms,
               holds.c.cap_periods))
_SET_HOLD_OUTCOME = Prepared(
    holds.update().where(holds.c.id == _b("hold_id"))
    .values(from_available_nano=_b("from_available"), shortfall_nano=_b("shortfall")))
_HOLD_COLUMNS = (holds.c.id, holds.c.account_id, holds.c.key_id, holds.c.amount_nano,
                 holds.c.expires_at_ms, holds.c.status, holds.c.charged_nano,
                 holds.c.from_available_nano, holds.c.shortfall_nano, holds.c.created_at_ms)
_GET_HOLD = Prepared(sa.select(*_HOLD_COLUMNS).where(holds.c.id == _b("hold_id")))
_FIND_HOLD = Prepared(sa.select(*_HOLD_COLUMNS).where(holds.c.idempotency_key == _b("key")))
#: What the wallet paid (held - delta: the charge less any shortfall) comes out of its
#: promotional part first, down to zero: a column expression of this same statement, so
#: promotional credit costs a settlement no extra statement (see ``ledger.grants``).
_PROMO = accounts.c.promo_nano
_SETTLE_ACCOUNT = Prepared(
    accounts.update().where(accounts.c.id == _b("account_id"))
    .values(held_nano=accounts.c.held_nano - _b("held"),
            available_nano=accounts.c.available_nano + _b("delta"),
            used_nano=accounts.c.used_nano + _b("charged"),
            requests=accounts.c.requests + _b("requests"),
            promo_nano=sa.case((_PROMO + _b("delta") > _b("held"),
                                _PROMO + _b("delta") - _b("held")), else_=0))
    .returning(*WATCHED))
#: PostgreSQL: a settlement the hold covers, in ONE statement (data-modifying CTEs): the hold
#: closed, the wallet's and the key's UPDATEs, the wallet's day, the entry and its postings —
#: what :func:`settle_hold` does in seven statements and three waits for a result. It books
#: exactly what that path books when ``from_available`` and ``shortfall`` are zero (so no
#: low-balance watch: a release alone never alerts). The wallet is locked before the key (each
#: later step reads the one before it), as every other path does. No row: the hold was not
#: open or the charge exceeds it; nothing was written and :func:`settle_hold` goes the long way.
_SETTLE_COVERED = Prepared(lambda dialect: sa.text(f"""
WITH closed AS (
    UPDATE holds SET status = 'settled', closed_at_ms = :at, charged_nano = :charged,
                     from_available_nano = 0, shortfall_nano = 0
    WHERE id = :hold_id AND status = 'open' AND amount_nano >= :charged
    RETURNING account_id, key_id, amount_nano, created_at_ms, cap_periods
), wallet AS (
    UPDATE accounts AS a
    SET held_nano = a.held_nano - c.amount_nano,
        available_nano = a.available_nano + c.amount_nano - :charged,
        used_nano = a.used_nano + :charged, requests = a.requests + 1,
        promo_nano = GREATEST(a.promo_nano - :charged, 0)
    FROM closed AS c WHERE a.id = c.account_id
    RETURNING a.id, a.available_nano + a.held_nano AS total_nano, a.promo_nano
), day AS (
    INSERT INTO wallet_days (account_id, day_ms, topups_nano, adjustments_nano, charges_nano,
                             written_off_nano, grants_nano, grants_expired_nano, promo_end_nano)
    SELECT w.id, :day, 0, 0, :charged, 0, 0, 0, LEAST(w.promo_nano, w.total_nano) FROM wallet AS w
    ON CONFLICT (account_id, day_ms) DO UPDATE
    SET charges_nano = wallet_days.charges_nano + excluded.charges_nano,
        promo_end_nano = excluded.promo_end_nano
), key AS (
    UPDATE api_keys AS k
    SET held_nano = k.held_nano - c.amount_nano, used_nano = k.used_nano + :charged,
        open_holds = k.open_holds - 1,
        window_tokens = k.window_tokens
            + CASE WHEN k.window_start_ms = :window THEN :tokens ELSE 0 END
    FROM closed AS c, wallet AS w WHERE k.id = c.key_id
), entry AS (
    INSERT INTO entries (kind, account_id, amount_nano, hold_id, idempotency_key,
                         created_at_ms)
    SELECT 'settle', w.id, :charged, :hold_id, :key, :at FROM wallet AS w
    RETURNING id, account_id
), lines AS (
    INSERT INTO postings (entry_id, account_id, bucket, amount_nano)
    SELECT e.id, v.account_id, '{AVAILABLE}', v.amount_nano
    FROM entry AS e CROSS JOIN LATERAL (VALUES (e.account_id, -:charged), ({REVENUE}, :charged))
         AS v (account_id, amount_nano)
    WHERE :charged <> 0
)
SELECT account_id, key_id, amount_nano, created_at_ms, cap_periods FROM closed
""").bindparams(*(sa.bindparam(name, type_=sa.BigInteger) for name in (
    "at", "charged", "hold_id", "day", "window", "tokens")), sa.bindparam("key", type_=sa.String)))
_EXPIRED = Prepared(
    sa.select(holds.c.id).where(holds.c.status == "open", holds.c.expires_at_ms <= _b("at"))
    .order_by(holds.c.expires_at_ms).limit(_b("limit")))


# --------------------------------------------------------------------------- helpers


def _existing_entry(conn: Connection, key: str) -> Any:
    """The entry of a used idempotency key (id, account_id, amount_nano, hold_id,
    balance_after_nano, by name), or None."""
    return _FIND_ENTRY.row(conn, key=key)


def _conflict(key: str, what: str) -> IdempotencyConflict:
    return IdempotencyConflict(f"idempotency key {key!r} was already used for {what}")


def _post(conn: Connection, *, kind: str, account_id: int, amount_nano: int, key: str,
          lines: list[tuple[int, str, int]], at_ms: int, hold_id: int | None = None,
          balance_after_nano: int | None = None, note: str | None = None) -> int:
    """Write one entry and its postings; the postings must sum to zero."""
    assert sum(amount for _, _, amount in lines) == 0, lines
    entry_id = int(_INSERT_ENTRY.one(
        conn, kind=kind, account_id=account_id, amount_nano=amount_nano, hold_id=hold_id,
        idempotency_key=key, balance_after_nano=balance_after_nano, note=note,
        created_at_ms=at_ms)[0])
    params: dict[str, Any] = {"entry_id": entry_id}
    moving = [line for line in lines if line[2]]
    for i, (acct, bucket, amount) in enumerate(moving):
        params.update({f"a{i}": acct, f"b{i}": bucket, f"x{i}": amount})
    if moving:
        _INSERT_POSTINGS[len(moving)].execute(conn, params)
    return entry_id


def _require_customer(conn: Connection, account_id: int) -> int | None:
    """Raise unless a customer account; returns when it was disabled (None: it is not)."""
    row = _ACCOUNT_KIND.row(conn, account_id=account_id)
    if row is None or row.kind != "customer":
        raise UnknownAccount(f"no customer account with id {account_id}")
    return None if row.disabled_at_ms is None else int(row.disabled_at_ms)


def _available(conn: Connection, account_id: int) -> int:
    return int(_AVAILABLE.row(conn, account_id=account_id).available_nano)


def _amount(value: object, what: str, *, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidRequest(f"{what} must be an integer of nano-USD >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------- credits


def topup(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
          at_ms: int, note: str | None = None) -> Topup:
    """Credit a wallet from the funding account."""
    _amount(amount_nano, "a top-up")
    key = f"topup:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        if (row.account_id, row.amount_nano) != (account_id, amount_nano):
            raise _conflict(idempotency_key, f"a top-up of {format_usd(row.amount_nano)} USD "
                            f"to account {row.account_id}")
        return Topup(row.id, row.account_id, row.amount_nano, row.balance_after_nano)
    credited = _CREDIT.row(conn, account_id=account_id, amount=amount_nano)
    if credited is None:
        raise UnknownAccount(f"no customer account with id {account_id}")
    balance = int(credited.available_nano)
    watch(conn, account_id, amount_nano, credited, at_ms=at_ms)
    wallet_days.count(conn, account_id, at_ms=at_ms, topups=amount_nano)
    entry_id = _post(conn, kind="topup", account_id=account_id, amount_nano=amount_nano, key=key,
                     balance_after_nano=balance, note=note, at_ms=at_ms,
                     lines=[(FUNDING, AVAILABLE, -amount_nano),
                            (account_id, AVAILABLE, amount_nano)])
    return Topup(entry_id, account_id, amount_nano, balance)


def adjust(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
           at_ms: int, note: str | None = None) -> Adjustment:
    """An operator correction: positive credits the wallet, negative debits it (never below
    zero: a debit larger than the available balance is refused)."""
    if not isinstance(amount_nano, int) or isinstance(amount_nano, bool) or amount_nano == 0:
        raise InvalidRequest(f"an adjustment must be a non-zero amount, got {amount_nano!r}")
    key = f"adjust:{idempotency_key}"
    if (row := _existing_entry(conn, key)) is not None:
        if (row.account_id, row.amount_nano) != (account_id, amount_nano):
            raise _conflict(idempotency_key, f"an adjustment of {format_usd(row.amount_nano)} "
                            f"USD to account {row.account_id}")
        return Adjustment(row.id, row.account_id, row.amount_nano, row.balance_after_nano)
    credited = _CREDIT.row(conn, account_id=account_id, amount=amount_nano)
    if credited is None:
        _require_customer(conn, account_id)
        raise InsufficientBalance(f"cannot debit {format_usd(-amount_nano)} USD: account "
                                  f"{account_id} has {format_usd(_available(conn, account_id))}"
                                  " USD available")
    balance = int(credited.available_nano)
    watch(conn, account_id, amount_nano, credited, at_ms=at_ms)
    wallet_days.count(conn, account_id, at_ms=at_ms, adjustments=amount_nano)
    entry_id = _post(conn, kind="adjust", account_id=account_id, amount_nano=amount_nano, key=key,
                     balance_after_nano=balance, note=note, at_ms=at_ms,
                     lines=[(ADJUSTMENTS, AVAILABLE, -amount_nano),
                            (account_id, AVAILABLE, amount_nano)])
    return Adjustment(entry_id, account_id, amount_nano, balance)


# --------------------------------------------------------------------------- holds


def place_hold(conn: Connection, account_id: int, amount_nano: int, *, idempotency_key: str,
               ttl_ms: int, at_ms: int, key_id: int | None = None,
               rate: RateAdmission = NO_ADMISSION, fresh_key: bool = False) -> Hold:
    """Reserve ``amount_nano`` of the available balance at ``at_ms``, or raise.

    The reservation is the hold's row and the wallet's ``held_nano``: nothing is booked in
    the ledger until the settlement. ``fresh_key``: the caller made ``idempotency_key`` itself
    and it has never been used (the gateway's request ids), so the look-up for an earlier hold
    under it is skipped; the unique index on ``holds.idempotency_key`` still refuses a repeat.

    With ``key_id`` the key's own limits are checked in the same transaction
    (:func:`guards.reserve`): its used plus held amount may not exceed its quota
    (:class:`QuotaExceeded`); ``rate``: its open holds may not reach ``max_open`` and its
    window may not pass ``rpm`` requests or ``tpm`` tokens (:class:`RateLimited`); in each
    period it has a cap for (day, week, month in the billing time zone) the held plus spent
    amount may not exceed the cap (:class:`QuotaExceeded` with ``retry_after_s``). A key's
    refusal carries its window without this request (:data:`guards.KeyRefusal`). Like every
    ledger function it must run in a transaction (or savepoint) that is rolled back when it
    raises.
    """
    _amount(amount_nano, "a hold")
    if not fresh_key and (row := _FIND_HOLD.row(conn, key=idempotency_key)) is not None:
        hold = _as_hold(row)
        if (hold.account_id, hold.amount_nano, hold.key_id) != (account_id, amount_nano, key_id):
            raise _conflict(idempotency_key, f"hold {hold.id}")
        return hold
    expires = at_ms + ttl_ms
    one = conn.dialect.name in ONE_STATEMENT
    if one:  # the wallet's, the key's and (mostly) the hold's statements in one
        reserved = _RESERVE_ALL.row(
            conn, **guards.reserve_params(key_id, amount_nano, at_ms, rate),
            account_id=account_id, expires=expires, key=idempotency_key)
    else:
        reserved = _RESERVE.row(conn, account_id=account_id, amount=amount_nano)
    if reserved is None:  # say why, the key's own refusal (401) first
        if key_id is not None:
            guards.check_usable(conn, key_id, at_ms)
        if _require_customer(conn, account_id) is not None:
            raise AccountDisabled(f"account {account_id} is disabled")
        raise InsufficientBalance(
            f"this request may cost up to {format_usd(amount_nano)} USD but the account has "
            f"{format_usd(_available(conn, account_id))} USD available")
    cap_periods, window = 0, None
    if key_id is not None:
        share = (guards.admitted(conn, None if reserved.window_start_ms is None else reserved,
                                 key_id, amount_nano, at_ms, rate) if one
                 else guards.reserve(conn, key_id, amount_nano, at_ms, rate))
        cap_periods, window = share.cap_periods, share.window
    watch(conn, account_id, -amount_nano, reserved, at_ms=at_ms)
    if one and reserved.hold_id is not None:
        hold_id = int(reserved.hold_id)
    else:
        hold_id = int(_INSERT_HOLD.one(conn, account_id=account_id, key_id=key_id,
                                       amount=amount_nano, at=at_ms, expires=expires,
                                       cap_periods=cap_periods, key=idempotency_key)[0])
    return Hold(hold_id, account_id, key_id, amount_nano, expires, "open", at_ms, window)


def settle_hold(conn: Connection, hold_id: int, actual_nano: int, *,
                idempotency_key: str, at_ms: int,
                correction: RateCorrection | None = None) -> Settlement:
    """Charge the actual cost: from the hold first, then from the available balance; what
    neither covers is written off (the wallet never goes below zero). Releases the rest.
    Books one entry: the wallet pays what it covered, revenue gets the whole charge, the
    write-off account the shortfall.
    ``at_ms`` is the time the charge is booked under: its entry, the wallet's day and its
    usage record's time; ``correction``, the tokens to add to the key's rate-limit window."""
    _amount(actual_nano, "a charge", minimum=0)
    key = f"settle:{idempotency_key}"
    if conn.dialect.name in ONE_STATEMENT and (covered := _settle_covered(
            conn, hold_id, actual_nano, key, at_ms, correction)) is not None:
        return covered
    closed = _close(conn, hold_id, "settled", actual_nano, at_ms)
    if closed is None:  # already closed: a repeat of this settlement, or too late
        if (row := _existing_entry(conn, key)) is not None:
            if (row.hold_id, row.amount_nano) != (hold_id, actual_nano):
                raise _conflict(idempotency_key, f"settling hold {row.hold_id}")
            return _settlement(conn, hold_id)
        raise HoldClosed(f"hold {hold_id} is already {_hold(conn, hold_id).status}")
    account_id, held = closed.account_id, closed.amount_nano
    from_hold = min(actual_nano, held)
    released = held - from_hold
    wanted = actual_nano - from_hold
    from_available = shortfall = 0
    if wanted:  # the request cost more than its hold: take the rest from the balance
        balance = int(_AVAILABLE_FOR_UPDATE.row(conn, account_id=account_id).available_nano)
        from_available = min(wanted, balance)
        shortfall = wanted - from_available
        _SET_HOLD_OUTCOME.execute(conn, {"hold_id": hold_id, "from_available": from_available,
                                         "shortfall": shortfall})
    settled = _SETTLE_ACCOUNT.row(conn, account_id=account_id, held=held,
                                  delta=released - from_available, charged=actual_nano,
                                  requests=1)
    # a release does not re-arm the alert: only the debit beyond the hold is watched
    watch(conn, account_id, min(0, released - from_available), settled, at_ms=at_ms)
    wallet_days.count(conn, account_id, at_ms=at_ms, charges=actual_nano - shortfall,
                      written_off=shortfall)
    if closed.key_id is not None:
        guards.close(conn, closed.key_id, held, actual_nano, closed.created_at_ms,
                     closed.cap_periods, correction)
    _post(conn, kind="settle", account_id=account_id, amount_nano=actual_nano, key=key,
          hold_id=hold_id, at_ms=at_ms,
          lines=[(account_id, AVAILABLE, shortfall - actual_nano),
                 (REVENUE, AVAILABLE, actual_nano), (WRITEOFF, AVAILABLE, -shortfall)])
    return Settlement(hold_id, actual_nano, from_hold, from_available, shortfall, released)


def _settle_covered(conn: Connection, hold_id: int, actual_nano: int, key: str, at_ms: int,
                    correction: RateCorrection | None) -> Settlement | None:
    """PostgreSQL: settle a hold that covers the charge in one statement
    (:data:`_SETTLE_COVERED`); None if it did not (nothing written)."""
    row = _SETTLE_COVERED.one(conn, hold_id=hold_id, charged=actual_nano, key=key, at=at_ms,
                              day=at_ms - at_ms % wallet_days.DAY_MS,
                              window=correction.window_start_ms if correction else -1,
                              tokens=correction.tokens if correction else 0)
    if row is None:
        return None
    _account_id, key_id, held, created_at_ms, cap_periods = row
    if key_id is not None and cap_periods:
        guards.close_periods(conn, key_id, held, actual_nano, created_at_ms, cap_periods)
    return Settlement(hold_id, actual_nano, actual_nano, 0, 0, held - actual_nano)


def void_hold(conn: Connection, hold_id: int, *, at_ms: int,
              correction: RateCorrection | None = None) -> Release:
    """Release a hold whole: the request was refused or failed upstream; nothing is charged
    and nothing is booked. Voiding a voided hold again returns the same release."""
    release = _release(conn, hold_id, "voided", at_ms, correction)
    if release is not None:
        return release
    hold = _hold(conn, hold_id)
    if hold.status != "voided":
        raise HoldClosed(f"hold {hold_id} is already {hold.status}")
    return Release(hold_id, hold.amount_nano, "voided")


def expire_holds(conn: Connection, now: int | None = None, *, limit: int = 1000) -> list[Release]:
    """Release holds nobody settled before their deadline (the reaper; ``now`` defaults to
    the wall clock). Returns what it released; call again while it returns ``limit`` items."""
    at = clock.now_ms() if now is None else now
    ids = [int(r[0]) for r in _EXPIRED.execute(conn, {"at": at, "limit": limit}).fetchall()]
    released: list[Release] = []
    for hid in ids:
        # None: settled or voided concurrently since the SELECT, nothing written
        if (release := _release(conn, hid, "expired", at)) is not None:
            released.append(release)
    return released


def hold_status(conn: Connection, idempotency_key: str) -> str | None:
    """The status of the hold placed with ``idempotency_key`` (see :func:`place_hold`), or
    None if there is none."""
    row = _FIND_HOLD.row(conn, key=idempotency_key)
    return None if row is None else str(row.status)


def open_holds(conn: Connection) -> tuple[int, int | None]:
    """(how many holds are open, when the oldest was placed in ms) — for monitoring. Open
    holds are the requests in flight, so this reads few rows (index on status)."""
    row = conn.execute(sa.select(sa.func.count().label("n"),
                                 sa.func.min(holds.c.created_at_ms).label("oldest"))
                       .where(holds.c.status == "open")).one()
    return int(row.n), None if row.oldest is None else int(row.oldest)


def _release(conn: Connection, hold_id: int, status: HoldStatus, at_ms: int,
             correction: RateCorrection | None = None) -> Release | None:
    """Close an open hold as ``status`` and give its amount back to available; None if the
    hold was not open (nothing written)."""
    closed = _close(conn, hold_id, status, None, at_ms)
    if closed is None:
        return None
    account_id, held = closed.account_id, closed.amount_nano
    _SETTLE_ACCOUNT.execute(conn, {"account_id": account_id, "held": held, "delta": held,
                                   "charged": 0, "requests": 0}).fetchone()
    if closed.key_id is not None:
        guards.close(conn, closed.key_id, held, 0, closed.created_at_ms, closed.cap_periods,
                     correction)
    return Release(hold_id, held, status)


def _close(conn: Connection, hold_id: int, status: HoldStatus, charged: int | None,
           at_ms: int) -> _Closed | None:
    """Move an open hold to its final status at ``at_ms``; exactly one closer can win.
    Returns the hold, or None if it was not open. Closing first and looking for an earlier
    identical operation only when that fails keeps the common path one statement shorter."""
    row = _CLOSE_HOLD.row(conn, hold_id=hold_id, status=status, at=at_ms, charged=charged,
                          from_available=0 if charged is not None else None,
                          shortfall=0 if charged is not None else None)
    if row is None:
        return None
    return _Closed(int(row.account_id), row.key_id, int(row.amount_nano),
                   int(row.created_at_ms), int(row.cap_periods))


def _hold(conn: Connection, hold_id: int) -> Hold:
    row = _GET_HOLD.row(conn, hold_id=hold_id)
    if row is None:
        raise UnknownHold(f"no hold with id {hold_id}")
    return _as_hold(row)


def _as_hold(row: Any) -> Hold:
    return Hold(row.id, row.account_id, row.key_id, row.amount_nano, row.expires_at_ms,
                row.status, row.created_at_ms)


def _settlement(conn: Connection, hold_id: int) -> Settlement:
    row = _GET_HOLD.row(conn, hold_id=hold_id)
    charged, from_available, shortfall = row.charged_nano, row.from_available_nano, \
        row.shortfall_nano
    from_hold = charged - from_available - shortfall
    return Settlement(hold_id, charged, from_hold, from_available, shortfall,
                      row.amount_nano - from_hold)
