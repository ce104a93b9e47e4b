"""The per-worker API key cache: single-flight lookups with refresh-ahead.

A key is cached for ``ttl_s`` after its lookup. In the last quarter of that time a request
still gets the cached record at once while one background lookup refreshes it, so a busy key
never waits for the database (no request pays a lookup while its key is in use); an entry that
has expired is looked up before the request proceeds, once: requests for the same key that
arrive meanwhile wait for that lookup instead of each querying the database.

What a cached record may miss is bounded by ``ttl_s`` (a revocation or a new limit made through
another process). The cache is an optimisation, not a control: money is guarded in the
database by the hold's own guarded statement, so a key revoked a moment ago may pass
authentication here and still be refused when its hold is placed. ``clear`` (a change made
through this process) drops every entry at once; a lookup that was in flight when it was
cleared answers its waiters but is not stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from tollway.errors import StorageUnavailable

log = logging.getLogger("tollway")

T = TypeVar("T")

#: Beyond this many entries the cache starts again empty (a flood of random keys cannot grow
#: a worker without bound).
MAX_ENTRIES = 100_000
#: The fraction of ``ttl_s`` at the end of an entry's life when a use refreshes it ahead.
REFRESH_AHEAD = 0.25


class KeyCache(Generic[T]):
    def __init__(self, lookup: Callable[[str], Awaitable[T]], *, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lookup = lookup
        self.ttl_s = ttl_s
        self._clock = clock
        #: digest -> (refresh after, expires at, record)
        self._entries: dict[str, tuple[float, float, T]] = {}
        self._pending: dict[str, asyncio.Future[T]] = {}
        self._generation = 0
        #: lookups started (for tests: how often the database was asked)
        self.lookups = 0

    async def get(self, digest: str) -> T:
        entry = self._entries.get(digest)
        now = self._clock()
        if entry is not None and entry[1] > now:
            if entry[0] <= now and digest not in self._pending:
                self._start(digest).add_done_callback(_ignore_failure)
            return entry[2]
        pending = self._pending.get(digest) or self._start(digest)
        return await asyncio.shield(pending)

    def clear(self) -> None:
        self._entries.clear()
        self._generation += 1

    def __len__(self) -> int:
        return len(self._entries)

    def _start(self, digest: str) -> asyncio.Future[T]:
        self.lookups += 1
        generation = self._generation
        future = asyncio.ensure_future(self._lookup(digest))
        self._pending[digest] = future

        def done(fut: asyncio.Future[T]) -> None:
            if self._pending.get(digest) is fut:
                del self._pending[digest]
            if fut.cancelled() or generation != self._generation:
                return
            if fut.exception() is not None:
                # an unknown key is not cached (nor kept: a deleted key stops at once); a
                # database failure keeps the entry until it expires
                if not _transient(fut.exception()):
                    self._entries.pop(digest, None)
                return
            if len(self._entries) >= MAX_ENTRIES and digest not in self._entries:
                self._entries.clear()
            at = self._clock()
            self._entries[digest] = (at + self.ttl_s * (1 - REFRESH_AHEAD), at + self.ttl_s,
                                     fut.result())

        future.add_done_callback(done)
        return future


def _transient(exc: BaseException | None) -> bool:
    return isinstance(exc, StorageUnavailable)


def _ignore_failure(fut: asyncio.Future[Any]) -> None:
    """A background refresh that failed is retried by the next use; its error is not lost
    silently (asyncio would log "exception was never retrieved")."""
    with contextlib.suppress(asyncio.CancelledError):
        exc = fut.exception()
        if exc is not None and _transient(exc):
            log.warning("refreshing a cached API key failed: the database is unavailable")
