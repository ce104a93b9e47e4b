"""The webhook signature scheme, written once (the README shows the receiver's side).

``X-Tollway-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>`` where
``timestamp`` is ``X-Tollway-Timestamp`` (unix seconds, the moment of this attempt) and
``body`` the exact bytes of the request body. Signing the timestamp with the body lets a
receiver refuse replays older than its tolerance window; the ``v1=`` prefix leaves room for
another scheme (or two secrets during a rotation) in the same header.
"""

from __future__ import annotations

import hashlib
import hmac

SCHEME = "v1"
#: What a receiver should accept between our clock and theirs (the README snippet uses it).
TOLERANCE_S = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def headers(secret: str, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"Content-Type": "application/json", "User-Agent": "Tollway-Webhooks/1",
            "X-Tollway-Event-Id": event_id, "X-Tollway-Timestamp": str(timestamp),
            "X-Tollway-Signature": signature(secret, timestamp, body)}


def verify(secret: str, header: str, timestamp: str, body: bytes, *, now_s: int,
           tolerance_s: int = TOLERANCE_S) -> bool:
    """The receiver's check (the same as the README snippet): a fresh timestamp and a
    matching ``v1`` signature, compared in constant time."""
    if not timestamp.isdigit() or abs(now_s - int(timestamp)) > tolerance_s:
        return False
    expected = signature(secret, int(timestamp), body)
    return any(hmac.compare_digest(expected, part.strip()) for part in header.split(","))
