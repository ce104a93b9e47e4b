"""What a running server holds: the database, the writer, the admin token, the clock."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.engine import Connection
from starlette.concurrency import run_in_threadpool

from tollway.billing import grants
from tollway.billing.keys import Network
from tollway.clock import Clock, now_ms
from tollway.errors import StorageUnavailable
from tollway.ledger import ledger
from tollway.money import format_usd
from tollway.notify.deliverer import Deliverer
from tollway.store.db import Database, storage_error
from tollway.store.writer import Writer
from tollway.upstreams.channels import Board

T = TypeVar("T")
log = logging.getLogger("tollway")


@dataclass
class Context:
    db: Database
    writer: Writer
    admin_token: str
    hold_ttl_ms: int
    reaper_interval_s: int
    max_body_bytes: int = 10 * 1024 * 1024  # request bodies (settings: max_body_bytes)
    #: delivers queued notifications every ``notify_interval_s`` (0: leave it to the CLI)
    deliverer: Deliverer | None = None
    notify_interval_s: float = 0
    #: the server's one clock (ms since the epoch); tests pass one they move
    clock: Clock = now_ms
    #: proxies whose ``X-Forwarded-For`` is believed (``runtime.http.client_address``)
    trusted_proxies: tuple[Network, ...] = ()
    #: every channel of the catalog with this process's circuit state (gateway and admin API)
    channels: Board = field(default_factory=Board)
    _reaper: asyncio.Task[None] | None = field(default=None, repr=False)
    _notifier: asyncio.Task[None] | None = field(default=None, repr=False)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """Run a read-only query on a pooled connection, off the event loop."""
        def run() -> T:
            try:
                with self.db.read() as conn:
                    return fn(conn)
            except Exception as exc:
                unavailable = storage_error(exc)
                if unavailable is None:
                    raise
                raise unavailable from None

        return await run_in_threadpool(run)

    async def write(self, fn: Callable[[Connection], T], *, account_id: int | None = None) -> T:
        """Run a write in the writer's next durable batch (``account_id``: the customer
        account whose rows it locks, which orders the batch; see ``Writer``)."""
        return await self.writer.run(fn, account_id=account_id)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._reaper = loop.create_task(self._reap())
        if self.deliverer is not None and self.notify_interval_s > 0:
            self._notifier = loop.create_task(
                self.deliverer.run_forever(self.notify_interval_s))

    async def stop(self) -> None:
        for task in (self._reaper, self._notifier):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.deliverer is not None:
            await self.deliverer.close()
        await run_in_threadpool(self.writer.close)
        self.db.dispose()

    async def _reap(self) -> None:
        """Release holds whose deadline passed (their request's process died)."""
        while True:
            await asyncio.sleep(self.reaper_interval_s)
            try:
                released = await self.write(ledger.expire_holds)
            except StorageUnavailable:
                log.warning("releasing expired holds failed: the database is unavailable")
                continue
            except Exception:  # noqa: BLE001 - keep reaping; the next round retries
                log.exception("releasing expired holds failed")
                continue
            if released:
                log.info("released %d expired holds", len(released))
            try:  # promotional credit whose expiry has come (billing/grants.py)
                taken = await self.write(lambda conn: grants.expire_due(
                    conn, at_ms=self.clock()))
            except Exception:  # noqa: BLE001 - the next round retries
                log.exception("expiring promotional credit failed")
                continue
            if taken:
                log.info("took back %s USD of expired promotional credit", format_usd(taken))

