"""The deliverer: drains the notification outbox (started with the server, or one pass with
``tollway notify deliver``).

Each pass claims due deliveries in one short transaction, sends them concurrently outside any
transaction, and records every attempt (status code, error, duration) in another. A failure is
retried after ``retry_base * 2**(attempt-1)`` until ``max_attempts``; a worker that dies holding
a claim loses it when its lease (longer than the send timeout) runs out, and the next worker
makes the next attempt. A receiver may still see an event twice (our record of its 2xx lost to
a crash): the event id in ``X-Tollway-Event-Id`` is what it deduplicates on.

The ``recharge`` channel is not a message: its delivery is the charge of a saved card
(``billing.auto_recharge.run``), attempted once (the charge itself is guarded; a failure is
counted there, and the next debit below the threshold queues the next try) — unless
Stripe's answer was lost: that delivery is retried like a message, and resumes the same
charge under the same idempotency key.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from sqlalchemy.engine import Connection

from tollway import clock, settings
from tollway.billing import auto_recharge
from tollway.errors import StorageUnavailable
from tollway.notify import mail, signing, targets
from tollway.store import notifications as store
from tollway.store.notifications import Claimed

T = TypeVar("T")
#: Runs a function in a write transaction: the server's writer, or ``Database.run_write``.
Write = Callable[[Callable[[Connection], Any]], Awaitable[Any]]
log = logging.getLogger("tollway.notify")
#: how often a serving deliverer prunes old notifications
PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    retry_base_ms: int = 30_000
    max_attempts: int = 8
    timeout_s: float = 10.0
    batch: int = 50
    allow_private_targets: bool = False
    smtp_url: str = ""
    email_from: str = "tollway@localhost"
    retention_days: int = 90  # older events, deliveries and attempts are pruned

    @property
    def lease_ms(self) -> int:
        """A claim outlives the longest send, so no other worker retries a live attempt."""
        return int(self.timeout_s * 1000) * 3 + 30_000

    def retry_at(self, attempt: int, now_ms: int) -> int | None:
        if attempt >= self.max_attempts:
            return None
        return now_ms + (self.retry_base_ms << (attempt - 1))

    @classmethod
    def from_settings(cls) -> Policy:
        return cls(retry_base_ms=int(float(settings.get("notify_retry_base_seconds")) * 1000),
                   max_attempts=int(settings.get("notify_max_attempts")),
                   timeout_s=float(settings.get("notify_timeout_seconds")),
                   allow_private_targets=settings.get("notify_allow_private_targets").lower()
                   in ("1", "true", "yes"),
                   smtp_url=settings.get("smtp_url"),
                   email_from=settings.get("notify_email_from"),
                   retention_days=int(settings.get("notify_retention_days")))


@dataclass(frozen=True, slots=True)
class Outcome:
    target: str | None
    status_code: int | None
    error: str | None  # None: delivered
    final: bool = False  # no point retrying (nowhere to deliver to)


class Deliverer:
    def __init__(self, write: Write, policy: Policy | None = None, *,
                 clock_ms: Callable[[], int] = clock.now_ms) -> None:
        self.write = write
        self.policy = policy or Policy.from_settings()
        self.clock_ms = clock_ms
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def run_once(self) -> int:
        """One pass: claim a batch of due deliveries, attempt each once. Returns how many."""
        now = self.clock_ms()
        policy = self.policy
        claimed: list[Claimed] = await self.write(lambda conn: store.claim(
            conn, now_ms=now, lease_ms=policy.lease_ms, limit=policy.batch))
        outcomes = await asyncio.gather(*(self._attempt(c) for c in claimed),
                                        return_exceptions=True)
        # An attempt not recorded (say, the database went away): its lease runs out and a
        # later pass makes the next attempt.
        for failure in outcomes:
            if isinstance(failure, StorageUnavailable):
                log.warning("recording a delivery attempt failed: the database is unavailable")
            elif failure is not None:
                log.error("recording a delivery attempt failed: %r", failure)
        return len(claimed)

    async def drain(self) -> int:
        """Passes until nothing is due (the CLI's one-shot)."""
        total = 0
        while n := await self.run_once():
            total += n
        return total

    async def prune(self, *, older_than_days: int | None = None, batch: int = 1000) -> int:
        """Delete events older than the retention (with their deliveries and attempts), in
        batches of ``batch`` per transaction; events with a pending delivery stay."""
        days = self.policy.retention_days if older_than_days is None else older_than_days
        before = self.clock_ms() - days * 86_400_000
        total = 0
        while n := await self.write(lambda conn: store.prune(conn, before_ms=before,
                                                             limit=batch)):
            total += n
        return total

    async def run_forever(self, interval_s: float) -> None:
        pruned_at = 0.0
        while True:
            try:
                if time.monotonic() - pruned_at >= PRUNE_EVERY_S or not pruned_at:
                    pruned_at = time.monotonic()
                    if n := await self.prune():
                        log.info("pruned %d notification events older than %d days", n,
                                 self.policy.retention_days)
                while await self.run_once() == self.policy.batch:
                    pass
            except StorageUnavailable:  # the next round retries; a traceback says nothing
                log.warning("delivering notifications failed: the database is unavailable")
            except Exception:  # noqa: BLE001 - keep delivering; the next round retries
                log.exception("delivering notifications failed")
            await asyncio.sleep(interval_s)

    async def _attempt(self, claimed: Claimed) -> None:
        started = self.clock_ms()
        t0 = time.monotonic()
        if claimed.channel == "webhook":
            outcome = await self._post(claimed)
        elif claimed.channel == store.RECHARGE:
            outcome = await self._recharge(claimed)
        else:
            outcome = await self._email(claimed)
        duration = int((time.monotonic() - t0) * 1000)
        now = self.clock_ms()
        retry = None if outcome.final else self.policy.retry_at(claimed.attempt, now)
        await self.write(lambda conn: store.record_attempt(
            conn, claimed, target=outcome.target, started_at_ms=started, duration_ms=duration,
            status_code=outcome.status_code, error=outcome.error, now_ms=now, retry_at_ms=retry))

    async def _post(self, c: Claimed) -> Outcome:
        url = c.webhook_url
        if not url or not c.webhook_secret:
            return Outcome(None, None, "no webhook URL is configured", final=True)
        if (refused := targets.literal_refusal(
                url, allow_private=self.policy.allow_private_targets)) is not None:
            return Outcome(url, None, refused)
        body = c.body.encode()
        headers = signing.headers(c.webhook_secret, c.event_id, self.clock_ms() // 1000, body)
        if self._session is None:
            # the connect-time check: every address a name resolves to is judged, and the
            # connection goes only to addresses that passed (no DNS rebinding)
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
                resolver=None if self.policy.allow_private_targets
                else targets.PublicResolver()))
        try:
            async with self._session.post(
                    url, data=body, headers=headers, allow_redirects=False,
                    timeout=aiohttp.ClientTimeout(total=self.policy.timeout_s)) as response:
                status = response.status  # the body is never read: only the status counts
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = short_reason(exc)
            log.warning("webhook delivery %s to %s failed: %s (%r)", c.event_id, url, reason,
                        exc)
            return Outcome(url, None, reason)
        return Outcome(url, status, None if 200 <= status < 300 else f"HTTP {status}")

    async def _recharge(self, c: Claimed) -> Outcome:
        try:
            done = await auto_recharge.run(self.write, c.account_id, clock_ms=self.clock_ms)
        except StorageUnavailable:
            raise
        except auto_recharge.AnswerLost as lost:  # retried: the charge resumes, same key
            return Outcome("auto-recharge", None, str(lost))
        except Exception:  # noqa: BLE001 - recorded as a failed attempt; the log has why
            log.exception("auto-recharge of account %s failed", c.account_id)
            return Outcome("auto-recharge", None, "the recharge failed", final=True)
        return Outcome(f"auto-recharge: {done}", None, None)

    async def _email(self, c: Claimed) -> Outcome:
        if not c.email:
            return Outcome(None, None, "no email address is configured", final=True)
        if not self.policy.smtp_url:
            return Outcome(c.email, None, "the operator has not configured smtp_url",
                           final=True)
        try:
            await asyncio.to_thread(mail.send, self.policy.smtp_url, self.policy.email_from,
                                    c.email, c.event_type, c.body,
                                    timeout_s=self.policy.timeout_s)
        except (OSError, mail.SMTPError) as exc:
            log.warning("email delivery %s failed: %r", c.event_id, exc)
            reason = ("the mail server refused the message" if isinstance(exc, mail.SMTPError)
                      else "could not reach the mail server")
            return Outcome(c.email, None, reason)
        return Outcome(c.email, None, None)


def short_reason(exc: BaseException) -> str:
    """What the customer's attempt log says about a failed connection: a short reason, never
    the exception's text (which names internal addresses, resolvers and library details; the
    server log has it)."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(getattr(exc, "os_error", None), targets.TargetRefused):
        return targets.REFUSED
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "the host name could not be resolved"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "the connection was refused or failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the receiver closed the connection"
    return "the delivery failed"
