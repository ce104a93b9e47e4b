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

    @classmethod
    def signup_from_settings(cls) -> Policy:
        """Sign-ups per client address: every POST to ``/signup`` counts, success or not."""
        return cls(max(1, int(settings.get("signup_max_per_address"))),
                   max(1, int(settings.get("signup_window_seconds"))) * 1000)


def _forget(conn: Connection, now_ms: int) -> None:
    """Rows older than their window count for nothing: deleted as new attempts arrive."""
    store.forget(conn, before_ms=now_ms - Policy.from_settings().window_ms,
                 signup_before_ms=now_ms - Policy.signup_from_settings().window_ms)


def signup_scope(address: object | None) -> list[str]:
    return ["signup:" + ip_scope(address)[0].removeprefix("ip:")]


def login_scope(login: str) -> str:
    """The count a login's failures go to: the login as ``store.accounts.login_row`` matches
    it (trimmed; emails case-insensitive), so case variants of an email share one count.
    NUL (no login has one; PostgreSQL text refuses it) is stored as U+FFFD."""
    login = login.strip()[:320].replace("\x00", "\ufffd")
    return f"login:{login.lower() if '@' in login else login}"


#: the one count shared by every client without an IP address (a Unix socket without
#: trusted proxy headers): such clients are not let off the throttle
NO_ADDRESS = "ip:unknown"


def ip_scope(address: object | None) -> list[str]:
    """The client address's count; clients without an IP address share one."""
    return [NO_ADDRESS] if address is None else [f"ip:{address}"]


@dataclass(frozen=True, slots=True)
class Claim:
    """An attempt admitted by :func:`claim`: counted as a failure until withdrawn."""
    ids: tuple[int, ...]


def claim(conn: Connection, scopes: list[str], policy: Policy, *, now_ms: int
          ) -> Claim | int:
    """Check and record in one transaction: either seconds to wait (the limit is reached for
    one of ``scopes``), or the attempt counted against every scope, before any password is
    checked. Attempts on the same scopes are serialised (``store.lock_scopes``), so however
    many guesses race, at most ``max_failures`` are admitted per window. The caller withdraws
    the claim on success (:func:`succeeded`); a failure, or a crash before the answer, leaves
    it counted."""
    store.lock_scopes(conn, scopes)
    _forget(conn, now_ms)
    wait = retry_after_s(conn, scopes, policy, now_ms=now_ms)
    if wait is not None:
        return wait
    return Claim(tuple(store.add_attempt(conn, scopes, at_ms=now_ms)))


def succeeded(conn: Connection, claim_: Claim, login: str | None) -> None:
    """A sign-in that succeeded: its own attempt is not a failure, and its login's count
    is cleared (not its address's)."""
    store.withdraw(conn, claim_.ids)
    if login is not None:
        store.clear_failures(conn, login_scope(login))


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
