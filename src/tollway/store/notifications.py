"""Notification settings, the event outbox, and the delivery queue any worker can drain.

An event is inserted in the transaction that moved the money (the ledger calls
:func:`balance_low`; billing calls :func:`enqueue` for top-ups), so it exists if and only if
the movement committed. Each configured channel gets a delivery row; a worker *claims* due rows
with one guarded UPDATE (a lease in ``claimed_until_ms`` plus a random ``claim_token``), sends
outside any transaction, and records the attempt only if its claim still holds. Two workers
(threads, processes, instances) therefore never send the same attempt twice: on PostgreSQL the
claim skips rows another transaction has locked and re-checks the lease after a concurrent
commit; on SQLite the write lock serialises claims.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import (
    accounts,
    notification_attempts,
    notification_deliveries,
    notification_events,
    notification_settings,
)

_ev, _dl, _at, _st = (notification_events, notification_deliveries, notification_attempts,
                      notification_settings)
EVENT_TYPES = ("balance.low", "balance.topup", "payment.reversed", "auto_recharge.succeeded",
               "auto_recharge.failed", "auto_recharge.paused")
#: The delivery channel of ``auto_recharge.due``: not a message, the charge of a saved card.
RECHARGE = "recharge"


@dataclass(frozen=True, slots=True)
class Settings:
    account_id: int
    low_balance_nano: int | None
    webhook_url: str | None
    webhook_secret: str | None  # None until the account first saves settings
    email: str | None


@dataclass(frozen=True, slots=True)
class Claimed:
    """One attempt a worker now owns: deliver it, then :func:`record_attempt`."""
    delivery_id: int
    attempt: int
    token: str
    channel: str
    event_id: str
    event_type: str
    account_id: int
    body: str
    webhook_url: str | None
    webhook_secret: str | None
    email: str | None


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- settings


def get_settings(conn: Connection, account_id: int) -> Settings:
    row = conn.execute(
        sa.select(accounts.c.low_balance_nano, _st.c.webhook_url, _st.c.webhook_secret,
                  _st.c.email)
        .select_from(accounts.outerjoin(_st, _st.c.account_id == accounts.c.id))
        .where(accounts.c.id == account_id)).one()
    return Settings(account_id, row[0], row[1], row[2], row[3])


def save_settings(conn: Connection, account_id: int, changes: dict[str, Any], *,
                  at_ms: int, rotate_secret: bool = False) -> Settings:
    """Apply ``changes`` (any of ``low_balance_nano``, ``webhook_url``, ``email``; None
    clears). The first save creates the signing secret. Setting a threshold arms the alert
    only if the available balance is at or above it now: no alert for a wallet already low."""
    if "low_balance_nano" in changes:
        threshold = changes["low_balance_nano"]
        conn.execute(accounts.update().where(accounts.c.id == account_id).values(
            low_balance_nano=threshold,
            low_balance_armed=sa.false() if threshold is None
            else accounts.c.available_nano >= threshold))
    fields = {k: v for k, v in changes.items() if k in ("webhook_url", "email")}
    exists = conn.execute(sa.select(_st.c.account_id)
                          .where(_st.c.account_id == account_id)).first() is not None
    if not exists:
        conn.execute(_st.insert().values(account_id=account_id, webhook_secret=new_secret(),
                                         updated_at_ms=at_ms, **fields))
    elif fields or rotate_secret:
        if rotate_secret:
            fields["webhook_secret"] = new_secret()
        conn.execute(_st.update().where(_st.c.account_id == account_id)
                     .values(updated_at_ms=at_ms, **fields))
    return get_settings(conn, account_id)


def set_armed(conn: Connection, account_id: int, armed: bool) -> None:
    conn.execute(accounts.update().where(accounts.c.id == account_id)
                 .values(low_balance_armed=armed))


# --------------------------------------------------------------------------- outbox


def balance_low(conn: Connection, account_id: int, *, data: dict[str, Any],
                at_ms: int) -> None:
    """The wallet crossed below its threshold: disarm and queue one ``balance.low``."""
    set_armed(conn, account_id, False)
    enqueue(conn, account_id, "balance.low", data, at_ms=at_ms)


def set_recharge_armed(conn: Connection, account_id: int, armed: bool) -> None:
    conn.execute(accounts.update().where(accounts.c.id == account_id)
                 .values(recharge_armed=armed))


def recharge_due(conn: Connection, account_id: int, *, data: dict[str, Any],
                 at_ms: int) -> str:
    """The wallet fell below its auto-recharge threshold: disarm and queue one
    ``auto_recharge.due`` whose only delivery is the ``recharge`` channel (any worker's
    deliverer claims it like a message and charges the card), whatever the account's
    notification settings."""
    set_recharge_armed(conn, account_id, False)
    return _insert_event(conn, account_id, "auto_recharge.due", data, at_ms=at_ms,
                         dedupe_key=None, channels=[RECHARGE])


def enqueue(conn: Connection, account_id: int, type_: str, data: dict[str, Any], *,
            at_ms: int, dedupe_key: str | None = None) -> str | None:
    """Insert an event and one pending delivery per configured channel; nothing for an
    account that never saved notification settings. With ``dedupe_key`` an event already
    queued under that key is not queued again (a repeated top-up)."""
    target = conn.execute(sa.select(_st.c.webhook_url, _st.c.email)
                          .where(_st.c.account_id == account_id)).first()
    if target is None or dedupe_key is not None and conn.execute(
            sa.select(_ev.c.id).where(_ev.c.dedupe_key == dedupe_key)).first() is not None:
        return None
    channels = [name for name, value in zip(("webhook", "email"), target, strict=True)
                if value]
    return _insert_event(conn, account_id, type_, data, at_ms=at_ms, dedupe_key=dedupe_key,
                         channels=channels)


def _insert_event(conn: Connection, account_id: int, type_: str, data: dict[str, Any], *,
                  at_ms: int, dedupe_key: str | None, channels: list[str]) -> str:
    public_id = "evt_" + secrets.token_hex(12)
    body = json.dumps({"id": public_id, "type": type_, "created_at": _iso(at_ms),
                       "account_id": account_id, "data": data}, separators=(",", ":"))
    event_id = conn.execute(_ev.insert().values(
        public_id=public_id, dedupe_key=dedupe_key, account_id=account_id, type=type_,
        body=body, created_at_ms=at_ms).returning(_ev.c.id)).scalar_one()
    for channel in channels:
        conn.execute(_dl.insert().values(event_id=event_id, channel=channel, status="pending",
                                         attempts=0, next_attempt_at_ms=at_ms))
    return public_id


# --------------------------------------------------------------------------- delivery


def _due(now_ms: int) -> sa.ColumnElement[bool]:
    return sa.and_(_dl.c.status == "pending", _dl.c.next_attempt_at_ms <= now_ms,
                   sa.or_(_dl.c.claimed_until_ms.is_(None), _dl.c.claimed_until_ms <= now_ms))


def claim(conn: Connection, *, now_ms: int, lease_ms: int, limit: int) -> list[Claimed]:
    """Take up to ``limit`` due deliveries for ``lease_ms``: each claim is the next attempt
    (``attempts`` is incremented here, so an attempt number is owned by one worker)."""
    token = secrets.token_hex(16)
    due = sa.select(_dl.c.id).where(_due(now_ms)).order_by(_dl.c.next_attempt_at_ms,
                                                            _dl.c.id).limit(limit)
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    conn.execute(_dl.update().where(_dl.c.id.in_(due.scalar_subquery()), _due(now_ms))
                 .values(claimed_until_ms=now_ms + lease_ms, claim_token=token,
                         attempts=_dl.c.attempts + 1))
    rows = conn.execute(
        sa.select(_dl.c.id, _dl.c.attempts, _dl.c.channel, _ev.c.public_id, _ev.c.type,
                  _ev.c.account_id, _ev.c.body, _st.c.webhook_url, _st.c.webhook_secret,
                  _st.c.email)
        .select_from(_dl.join(_ev, _ev.c.id == _dl.c.event_id)
                     .outerjoin(_st, _st.c.account_id == _ev.c.account_id))
        .where(_dl.c.claim_token == token).order_by(_dl.c.id)).all()
    return [Claimed(r[0], r[1], token, r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9])
            for r in rows]


def record_attempt(conn: Connection, claimed: Claimed, *, target: str | None,
                   started_at_ms: int, duration_ms: int, status_code: int | None,
                   error: str | None, now_ms: int, retry_at_ms: int | None) -> None:
    """Log the attempt and move the delivery on: delivered (``error`` None), retried at
    ``retry_at_ms``, or failed for good (``retry_at_ms`` None). A worker whose lease was
    taken over logs its attempt but changes nothing else."""
    conn.execute(_at.insert().values(
        delivery_id=claimed.delivery_id, attempt=claimed.attempt, target=target,
        started_at_ms=started_at_ms, duration_ms=duration_ms, status_code=status_code,
        error=error))
    if error is None:
        values: dict[str, Any] = {"status": "delivered", "delivered_at_ms": now_ms}
    elif retry_at_ms is None:
        values = {"status": "failed"}
    else:
        values = {"next_attempt_at_ms": retry_at_ms}
    conn.execute(_dl.update().where(_dl.c.id == claimed.delivery_id,
                                    _dl.c.claim_token == claimed.token)
                 .values(claimed_until_ms=None, claim_token=None, **values))


def list_events(conn: Connection, account_id: int, *, limit: int,
                before_id: int | None = None) -> list[dict[str, Any]]:
    """An account's events, newest first, each with its deliveries and their attempts."""
    query = sa.select(_ev).where(_ev.c.account_id == account_id)
    if before_id is not None:
        query = query.where(_ev.c.id < before_id)
    events = conn.execute(query.order_by(_ev.c.id.desc()).limit(limit)).all()
    ids = [e.id for e in events]
    deliveries = conn.execute(sa.select(_dl).where(_dl.c.event_id.in_(ids))
                              .order_by(_dl.c.id)).all() if ids else []
    attempts = conn.execute(
        sa.select(_at).where(_at.c.delivery_id.in_([d.id for d in deliveries]))
        .order_by(_at.c.delivery_id, _at.c.attempt)).all() if deliveries else []
    out = []
    for e in events:
        out.append({"row": e, "deliveries": [
            {"row": d, "attempts": [a for a in attempts if a.delivery_id == d.id]}
            for d in deliveries if d.event_id == e.id]})
    return out


def prune(conn: Connection, *, before_ms: int, limit: int) -> int:
    """Delete up to ``limit`` events created before ``before_ms`` with their deliveries and
    attempts (oldest first), except events with a delivery still pending. Returns how many."""
    pending = sa.exists().where(_dl.c.event_id == _ev.c.id, _dl.c.status == "pending")
    ids = list(conn.execute(sa.select(_ev.c.id).where(_ev.c.created_at_ms < before_ms,
                                                      sa.not_(pending))
                            .order_by(_ev.c.created_at_ms).limit(limit)).scalars())
    if not ids:
        return 0
    deliveries = sa.select(_dl.c.id).where(_dl.c.event_id.in_(ids)).scalar_subquery()
    conn.execute(_at.delete().where(_at.c.delivery_id.in_(deliveries)))
    conn.execute(_dl.delete().where(_dl.c.event_id.in_(ids)))
    conn.execute(_ev.delete().where(_ev.c.id.in_(ids)))
    return len(ids)
