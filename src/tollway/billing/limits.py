"""Rate limits: requests per minute (RPM), tokens per minute (TPM) and requests in flight
(concurrency) per API key, from the account's tier, lowered by the key's own overrides.

Windows are fixed minutes (``[m, m + 60 s)``) counted on the key's row in the database, by the
same guarded statement that books the hold on the key (``ledger``), so the limits hold across
workers and instances at no extra round trip. Tokens: at admission a request counts its
estimated prompt; when it is settled the window is corrected to its actual input + output
tokens (a voided request to 0), if the window it was admitted in is still the key's current
one. Concurrency is the key's open holds; a hold the reaper expires stops counting.

Every response to a request that reached the limiter carries, for each limit that applies::

    X-RateLimit-Limit-Requests: 60         the RPM limit
    X-RateLimit-Remaining-Requests: 59     what is left in this window after this request
    X-RateLimit-Reset-Requests: 12s        whole seconds (rounded up) until the window resets
    X-RateLimit-{Limit,Remaining,Reset}-Tokens   the same for TPM

and a 429 also ``Retry-After`` (whole seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

from tollway.errors import RateLimited, TollwayError
from tollway.ledger.guards import (
    NO_ADMISSION,
    UNLIMITED,
    KeyWindow,
    RateAdmission,
    RateCorrection,
)
from tollway.pricing.catalog import Tier
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


def admission(limits: Limits, tokens: int, at_ms: int) -> RateAdmission:
    """What the ledger's guarded statement checks for this request (nothing for a key with no
    limits). A request whose estimated tokens alone pass the TPM limit can never be admitted:
    :class:`RateLimited` at once, without Retry-After."""
    if limits.tpm is not None and tokens > limits.tpm:
        raise RateLimited(f"this request's estimated {tokens} prompt tokens exceed the key's "
                          f"limit of {limits.tpm} tokens per minute")
    if not limits.windowed and limits.concurrency is None:
        return NO_ADMISSION
    return RateAdmission(window_start(at_ms), tokens if limits.tpm is not None else 0,
                         _or_unlimited(limits.rpm), _or_unlimited(limits.tpm),
                         _or_unlimited(limits.concurrency))


def _or_unlimited(value: int | None) -> int:
    return UNLIMITED if value is None else value


def window(limits: Limits, at_ms: int, state: KeyWindow | None) -> Window | None:
    """The key's window as a request at ``at_ms`` sees it, from the stored one; an older
    stored window is over: this minute's starts empty."""
    if not limits.windowed or state is None:
        return None
    start = window_start(at_ms)
    if state.start_ms < start:
        return Window(limits, start, at_ms, 0, 0)
    return Window(limits, state.start_ms, at_ms, state.requests, state.tokens)


def explain(exc: TollwayError, limits: Limits, tokens: int, at_ms: int,
            state: KeyWindow) -> None:
    """Give a refused request the key's rate-limit headers (``state``: its window without this
    request) and, when the window refused it, the limit it hit and its Retry-After."""
    seen = window(limits, at_ms, state)
    if seen is None:
        return
    exc.headers = seen.headers()
    if not isinstance(exc, RateLimited):
        return
    if limits.rpm is not None and seen.requests + 1 > limits.rpm:
        exc.message = (f"this key's limit of {limits.rpm} requests per minute is reached; "
                       f"retry in {seen.reset_s} s")
    elif limits.tpm is not None and seen.tokens + tokens > limits.tpm and tokens <= limits.tpm:
        exc.message = (f"this key's limit of {limits.tpm} tokens per minute is reached; retry "
                       f"in {seen.reset_s} s")
    else:
        return
    exc.args = (exc.message,)
    exc.retry_after_s = seen.reset_s


def correction(win: Window | None, *, counted: int, actual: int) -> RateCorrection | None:
    """At settlement (``actual`` tokens) or void (0): replace what admission counted."""
    if win is None or win.limits.tpm is None or actual == counted:
        return None
    return RateCorrection(win.start_ms, actual - counted)
