"""Notification events, deliveries and attempts are pruned after
``TOLLWAY_NOTIFY_RETENTION_DAYS`` (issue 15), on SQLite and PostgreSQL; an event with a
delivery still pending is kept whatever its age."""

from __future__ import annotations

import asyncio
import json

import pytest
import sqlalchemy as sa

from fakes import closed_port
from tollway import cli, clock
from tollway.billing import credits
from tollway.billing import notifications as notify
from tollway.notify.deliverer import Deliverer, Policy
from tollway.store import accounts as account_store
from tollway.store.db import Database
from tollway.store.tables import (
    notification_attempts,
    notification_deliveries,
    notification_events,
)

DAY_MS = 86_400_000


def counts(db: Database) -> tuple[int, int, int]:
    with db.read() as conn:
        return tuple(int(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one())
                     for t in (notification_events, notification_deliveries,
                               notification_attempts))  # type: ignore[return-value]


def test_old_notifications_are_pruned_pending_ones_kept(
        db: Database, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    with db.write() as conn:
        account = account_store.create_account(conn, "kept", "default",
                                               at_ms=clock.now_ms()).id
        notify.update(conn, account, {"webhook_url": f"http://127.0.0.1:{closed_port()}/x"},
                      at_ms=clock.now_ms())
        for i in range(3):
            credits.topup(conn, account, 10**9, idempotency_key=f"t{i}", at_ms=clock.now_ms())

    async def deliver() -> int:
        d = Deliverer(lambda fn: asyncio.to_thread(db.run_write, fn),
                      Policy(retry_base_ms=0, max_attempts=1, timeout_s=5,
                             allow_private_targets=True))
        try:
            return await d.drain()
        finally:
            await d.close()
    assert asyncio.run(deliver()) == 3  # three failed deliveries, one attempt each
    with db.write() as conn:
        credits.topup(conn, account, 10**9, idempotency_key="t3",
                      at_ms=clock.now_ms())  # pending
    assert counts(db) == (4, 4, 3)
    now = clock.now_ms()
    with db.write() as conn:
        ids = list(conn.execute(sa.select(notification_events.c.id)
                                .order_by(notification_events.c.id)).scalars())
        ages = {ids[0]: 91, ids[1]: 90, ids[2]: 89, ids[3]: 200}  # days; the last is pending
        for event_id, days in ages.items():
            conn.execute(notification_events.update().where(notification_events.c.id == event_id)
                         .values(created_at_ms=now - days * DAY_MS - 60_000))

    assert cli.main(["--database-url", db.url, "--json", "notify", "prune"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pruned_events": 2}  # 91 and 90 days
    assert counts(db) == (2, 2, 1)
    with db.read() as conn:
        left = list(conn.execute(sa.select(notification_events.c.id)
                                 .order_by(notification_events.c.id)).scalars())
    assert left == [ids[2], ids[3]]
    # a shorter retention, from the setting
    monkeypatch.setenv("TOLLWAY_NOTIFY_RETENTION_DAYS", "1")
    assert cli.main(["--database-url", db.url, "--json", "notify", "prune"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pruned_events": 1}
    assert counts(db) == (1, 1, 0)  # only the pending one stays
    assert ledger_ok(db)


def ledger_ok(db: Database) -> bool:
    from tollway.ledger.verify import verify
    with db.read() as conn:
        return verify(conn) == []
