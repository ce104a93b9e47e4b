"""Sign-in throttle: after ``signin_max_failures`` failed console sign-ins within
``signin_window_seconds`` for one login or one client address, further attempts are refused
before the password is checked (no scrypt work for a guesser), until enough of those failures
are older than the window. Counts live in the database (``store.signin``), so all workers and
instances share them. A successful sign-in clears its login's count (not its address's: one
known password must not reset the count of a guesser behind the same address)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Connection

from tollway import settings
from tollway.store import signin as store


@dataclass(frozen=True, slots=True)
class Policy:
    max_failures: int
    window_ms: int

    @classmethod
    def from_settings(cls) -> Policy:
        return cls(max(1, int(settings.get("signin_max_failures"))),
                   max(1, int(settings.get("signin_window_seconds"))) * 1000)


def login_scope(login: str) -> str:
    """The count a login's failures go to: the login as ``store.accounts.login_row`` matches
    it (trimmed; emails case-insensitive), so case variants of an email share one count.
    NUL (no login has one; PostgreSQL text refuses it) is stored as U+FFFD."""
    login = login.strip()[:320].replace("\x00", "\ufffd")
    return f"login:{login.lower() if '@' in login else login}"


def ip_scope(address: object | None) -> list[str]:
    """The client address's count, if the client has an IP address (not a socket path)."""
    return [] if address is None else [f"ip:{address}"]


def retry_after_s(conn: Connection, scopes: list[str], policy: Policy, *,
                  now_ms: int) -> int | None:
    """None when a sign-in may be tried; else whole seconds until one of ``scopes`` drops
    under the limit (its max_failures-th newest failure leaves the window), at least 1."""
    since = now_ms - policy.window_ms
    wait_ms = 0
    for times in store.recent_failures(conn, scopes, since_ms=since,
                                       limit=policy.max_failures).values():
        if len(times) >= policy.max_failures:
            wait_ms = max(wait_ms, times[-1] + policy.window_ms - now_ms)
    return None if wait_ms <= 0 else -(-wait_ms // 1000)


def record_failure(conn: Connection, scopes: list[str], policy: Policy, *,
                   now_ms: int) -> None:
    store.add_failures(conn, scopes, at_ms=now_ms, forget_before_ms=now_ms - policy.window_ms)


def record_success(conn: Connection, login: str) -> None:
    store.clear_failures(conn, login_scope(login))
