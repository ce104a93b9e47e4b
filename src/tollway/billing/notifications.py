"""Notification settings and delivery logs as the API and the CLI show them (money as decimal
strings), and the checks on what a customer may configure."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import Connection

from tollway.billing.views import iso, parse_amount
from tollway.errors import InvalidRequest
from tollway.money import format_usd
from tollway.store import notifications as store
from tollway.store.notifications import Settings

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
FIELDS = {"low_balance_threshold_usd": "low_balance_nano", "webhook_url": "webhook_url",
          "email": "email"}


def settings_view(s: Settings) -> dict[str, Any]:
    return {"object": "notification_settings", "account_id": s.account_id,
            "low_balance_threshold_usd": (None if s.low_balance_nano is None
                                          else format_usd(s.low_balance_nano)),
            "webhook_url": s.webhook_url, "webhook_secret": s.webhook_secret,
            "email": s.email}


def parse_changes(body: dict[str, Any]) -> dict[str, Any]:
    """The fields given (null clears one) as store columns; unknown fields are an error."""
    unknown = set(body) - set(FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown fields: {', '.join(sorted(unknown))}; settable: "
                             f"{', '.join(FIELDS)}")
    changes: dict[str, Any] = {}
    for name, value in body.items():
        if value is None or value == "":
            changes[FIELDS[name]] = None
        elif name == "low_balance_threshold_usd":
            changes["low_balance_nano"] = parse_amount(value, what=name)
        elif not isinstance(value, str):
            raise InvalidRequest(f"{name} must be a string or null")
        elif name == "webhook_url":
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname or len(value) > 2000:
                raise InvalidRequest("webhook_url must be an http:// or https:// URL")
            changes["webhook_url"] = value
        else:
            if not _EMAIL.match(value) or len(value) > 320:
                raise InvalidRequest(f"email is not an email address: {value!r}")
            changes["email"] = value
    return changes


def update(conn: Connection, account_id: int, body: dict[str, Any], *, at_ms: int,
           rotate_secret: bool = False) -> dict[str, Any]:
    changes = parse_changes(body)
    return settings_view(store.save_settings(conn, account_id, changes, at_ms=at_ms,
                                             rotate_secret=rotate_secret))


def current(conn: Connection, account_id: int) -> dict[str, Any]:
    return settings_view(store.get_settings(conn, account_id))


def events_page(conn: Connection, account_id: int, *, limit: int = 50,
                cursor: int | None = None) -> dict[str, Any]:
    """Events newest first, each with its deliveries and every attempt; ``next_cursor``
    continues below the last event shown."""
    events = store.list_events(conn, account_id, limit=limit + 1, before_id=cursor)
    more = len(events) > limit
    events = events[:limit]
    data = [{
        "id": e["row"].public_id, "type": e["row"].type, "created_at": iso(e["row"].created_at_ms),
        "body": e["row"].body,
        "deliveries": [{
            "channel": d["row"].channel, "status": d["row"].status,
            "attempts": d["row"].attempts,
            "next_attempt_at": (iso(d["row"].next_attempt_at_ms)
                                if d["row"].status == "pending" else None),
            "delivered_at": iso(d["row"].delivered_at_ms),
            "attempt_log": [{"attempt": a.attempt, "target": a.target,
                             "started_at": iso(a.started_at_ms), "duration_ms": a.duration_ms,
                             "status_code": a.status_code, "error": a.error}
                            for a in d["attempts"]]} for d in e["deliveries"]]}
        for e in events]
    return {"object": "list", "data": data,
            "next_cursor": str(events[-1]["row"].id) if more else None, "has_more": more}
