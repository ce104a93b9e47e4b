"""Rate limits: requests per minute (RPM), tokens per minute (TPM) and requests in flight
(concurrency) per API key, from the account's tier, lowered by the key's own overrides.

Windows are fixed minutes (``[m, m + 60 s)``) counted in the database (``store.limits``), in
the same writer transaction as the hold, so the limits hold across workers and instances at no
extra round trip. Tokens: at admission a request counts its estimated prompt; when it is
settled the window is corrected to its actual input + output tokens (a voided request to 0),
in the window it was admitted in. Concurrency is the key's open holds (``ledger``); a hold the
reaper expires stops counting.

Every response to a request that reached the limiter carries, for each limit that applies::

    X-RateLimit-Limit-Requests: 60         the RPM limit
    X-RateLimit-Remaining-Requests: 59     what is left in this window after this request
    X-RateLimit-Reset-Requests: 12s        whole seconds (rounded up) until the window resets
    X-RateLimit-{Limit,Remaining,Reset}-Tokens   the same for TPM

and a 429 also ``Retry-After`` (whole seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Connection

from tollway.errors import RateLimited
from tollway.ledger.ledger import UNLIMITED
from tollway.pricing.catalog import Tier
from tollway.store import limits as store
from tollway.store.accounts import KeyLimits

WINDOW_MS = 60_000


@dataclass(frozen=True, slots=True)
class Limits:
    """None = no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None

    @property
    def windowed(self) -> bool:
        return self.rpm is not None or self.tpm is not None


NO_LIMITS = Limits()


def _lower(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def effective(tier: Tier | None, key: KeyLimits) -> Limits:
    """The tier's limits, each lowered by the key's override where it has one."""
    return Limits(_lower(tier.rpm if tier else None, key.rpm),
                  _lower(tier.tpm if tier else None, key.tpm),
                  _lower(tier.concurrency if tier else None, key.concurrency))


def window_start(at_ms: int) -> int:
    return at_ms - at_ms % WINDOW_MS


def _seconds_until(end_ms: int, at_ms: int) -> int:
    return max(1, -(-(end_ms - at_ms) // 1000))


@dataclass(frozen=True, slots=True)
class Window:
    """A key's window as this request saw it (after counting it, when admitted)."""

    limits: Limits
    start_ms: int
    at_ms: int
    requests: int
    tokens: int

    @property
    def reset_s(self) -> int:
        return _seconds_until(self.start_ms + WINDOW_MS, self.at_ms)

    def uncounted(self, tokens: int) -> Window:
        """The window without this request (refused after it was counted, rolled back)."""
        return Window(self.limits, self.start_ms, self.at_ms, self.requests - 1,
                      self.tokens - tokens)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        reset = f"{self.reset_s}s".encode()
        for kind, limit, used in (("requests", self.limits.rpm, self.requests),
                                  ("tokens", self.limits.tpm, self.tokens)):
            if limit is None:
                continue
            out += [(b"x-ratelimit-limit-" + kind.encode(), str(limit).encode()),
                    (b"x-ratelimit-remaining-" + kind.encode(),
                     str(max(0, limit - used)).encode()),
                    (b"x-ratelimit-reset-" + kind.encode(), reset)]
        return out


def admit(conn: Connection, *, key_id: int, limits: Limits, tokens: int,
          at_ms: int) -> Window | None:
    """Count the request in its key's window, or raise :class:`RateLimited` (nothing
    counted). None when the key has no RPM or TPM limit."""
    if not limits.windowed:
        return None
    start = window_start(at_ms)
    rpm = UNLIMITED if limits.rpm is None else limits.rpm
    tpm = UNLIMITED if limits.tpm is None else limits.tpm
    counted = None if tokens > tpm else store.admit(conn, key_id=key_id, start_ms=start,
                                                     tokens=tokens, rpm=rpm, tpm=tpm)
    if counted is not None:
        return Window(limits, start, at_ms, *counted)
    seen = Window(limits, start, at_ms, *store.window(conn, key_id=key_id, start_ms=start))
    if tokens > tpm:
        exc = RateLimited(f"this request's estimated {tokens} prompt tokens exceed the key's "
                          f"limit of {tpm} tokens per minute")
    elif seen.requests + 1 > rpm:
        exc = RateLimited(f"this key's limit of {rpm} requests per minute is reached; retry "
                          f"in {seen.reset_s} s", retry_after_s=seen.reset_s)
    else:
        exc = RateLimited(f"this key's limit of {tpm} tokens per minute is reached; retry in "
                          f"{seen.reset_s} s", retry_after_s=seen.reset_s)
    exc.headers = seen.headers()
    raise exc


def settle_tokens(conn: Connection, *, key_id: int, window: Window | None, counted: int,
                  actual: int) -> None:
    """Replace the tokens counted at admission by the request's actual tokens."""
    if window is not None and window.limits.tpm is not None:
        store.add_tokens(conn, key_id=key_id, start_ms=window.start_ms, delta=actual - counted)


def prune(conn: Connection, *, now_ms: int) -> int:
    """Windows that ended are no longer read: delete them (the reaper does this)."""
    return store.prune(conn, before_ms=window_start(now_ms) - WINDOW_MS)
