"""Migration 0012_promo_credit on SQLite and PostgreSQL: it matches the tables, and its
backfill rebuilds from the ledger exactly what the code now writes on every movement (a
round trip down to 0011 and back gives the same daily rows), so statements of months before
the upgrade split paid and promotional balance too."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from test_promo_credit import DAY, JAN, grant, new_account, spend, topup

from fakes import USD
from tollway.billing import codes, grants
from tollway.ledger.verify import verify
from tollway.store.db import Database
from tollway.store.migrate import alembic_config, current_revision, head_revision, upgrade
from tollway.store.tables import metadata, wallet_days


def days(db: Database) -> list[tuple[int, ...]]:
    with db.read() as conn:
        return [tuple(r) for r in conn.execute(sa.select(wallet_days).order_by(
            wallet_days.c.account_id, wallet_days.c.day_ms))]


def test_0012_backfills_what_the_code_writes_and_downgrades(db: Database) -> None:
    a, b = new_account(db), new_account(db)
    topup(db, a, 10 * USD, JAN + DAY)
    grant(db, a, 4 * USD, JAN + 2 * DAY, JAN + 9 * DAY)
    spend(db, a, 1_000_000_007, JAN + 3 * DAY)
    spend(db, a, 500_000_000, JAN + 3 * DAY + 1)
    with db.write() as conn:
        assert grants.expire_due(conn, at_ms=JAN + 9 * DAY) == 2_499_999_993
    grant(db, a, 1 * USD, JAN + 40 * DAY, None)
    spend(db, a, 1_500_000_000, JAN + 41 * DAY)  # 1 promotional, 0.5 paid
    topup(db, b, 3 * USD, JAN + DAY)  # never had a grant
    with db.write() as conn:
        [code] = codes.mint(conn, 2 * USD, at_ms=JAN, credit_days=5)
    with db.write() as conn:
        codes.redeem(conn, b, code.code, JAN + 50 * DAY)
    before = days(db)
    assert [r[-3:] for r in before if r[0] == a] == [  # grants, expired, promo at day's end
        (0, 0, 0), (4 * USD, 0, 4 * USD), (0, 0, 2_499_999_993),
        (0, 2_499_999_993, 0), (1 * USD, 0, 1 * USD), (0, 0, 0)]

    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0011_channels")
    with db.read() as conn:  # grants went back into the day's adjustments
        assert "grants_nano" not in {c["name"] for c in sa.inspect(conn).get_columns(
            "wallet_days")}
        adjustments = conn.execute(sa.text(
            "SELECT SUM(adjustments_nano) FROM wallet_days WHERE account_id = :a"),
            {"a": a}).scalar_one()
    assert adjustments == 5 * USD - 2_499_999_993
    upgrade(db)
    assert current_revision(db) == head_revision()
    with db.read() as conn:
        assert [d for d in compare_metadata(MigrationContext.configure(conn), metadata)
                if "wallet_days" in repr(d) or "redemption_codes" in repr(d)] == []
        assert verify(conn) == []
    assert days(db) == before
