"""Migration 0015 on a database whose holds were booked the old way (an entry available → held
when placed, its reverse when closed), on SQLite and PostgreSQL: the holds still open are moved
off the ledger so that ``ledger verify`` stays clean, they settle and void the new way, their
keys still find them; and the migration downgrades and upgrades again."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from tollway import clock
from tollway.ledger import ledger, wallet_days
from tollway.ledger.ledger import REVENUE
from tollway.ledger.verify import verify
from tollway.store.accounts import create_account, get_account
from tollway.store.db import Database
from tollway.store.migrate import alembic_config, current_revision, upgrade
from tollway.store.tables import accounts, entries, holds, metadata, postings

USD = 1_000_000_000
T0 = 1_760_000_000_000


def downgrade(db: Database, revision: str) -> None:
    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def old_hold(conn: Connection, hold_id: int, account_id: int, amount: int, key: str) -> None:
    """A hold as the code before 0015 placed it: its row, its entry and two postings."""
    conn.execute(holds.insert().values(id=hold_id, account_id=account_id, amount_nano=amount,
                                       status="open", created_at_ms=T0,
                                       expires_at_ms=T0 + 3_600_000))
    old_entry(conn, hold_id * 10, "hold", account_id, amount, hold_id, f"hold:{key}",
              [(account_id, "available", -amount), (account_id, "held", amount)])
    conn.execute(accounts.update().where(accounts.c.id == account_id).values(
        available_nano=accounts.c.available_nano - amount,
        held_nano=accounts.c.held_nano + amount))


def old_entry(conn: Connection, entry_id: int, kind: str, account_id: int, amount: int,
              hold_id: int, key: str, lines: list[tuple[int, str, int]]) -> None:
    conn.execute(entries.insert().values(id=entry_id, kind=kind, account_id=account_id,
                                         amount_nano=amount, hold_id=hold_id,
                                         idempotency_key=key, created_at_ms=T0))
    conn.execute(postings.insert(), [{"entry_id": entry_id, "account_id": a, "bucket": b,
                                      "amount_nano": x} for a, b, x in lines])


def book_the_old_way(db: Database) -> int:
    """10 USD topped up; hold 901 (3 USD) open; hold 902 (2 USD) settled at 1.5 USD; hold 903
    (1 USD) voided; hold 904 (0.5 USD) open. Returns the account."""
    with db.write() as conn:
        alice = create_account(conn, "alice", "default", at_ms=T0).id
        ledger.topup(conn, alice, 10 * USD, idempotency_key="seed", at_ms=T0)
        old_hold(conn, 901, alice, 3 * USD, "req_open")
        old_hold(conn, 902, alice, 2 * USD, "req_settled")
        old_entry(conn, 9021, "settle", alice, 1_500_000_000, 902, "settle:req_settled",
                  [(alice, "held", -2 * USD), (alice, "available", 500_000_000),
                   (REVENUE, "available", 1_500_000_000)])
        conn.execute(holds.update().where(holds.c.id == 902).values(
            status="settled", closed_at_ms=T0, charged_nano=1_500_000_000,
            from_available_nano=0, shortfall_nano=0))
        conn.execute(accounts.update().where(accounts.c.id == alice).values(
            available_nano=accounts.c.available_nano + 2 * USD - 1_500_000_000,
            held_nano=accounts.c.held_nano - 2 * USD, used_nano=1_500_000_000, requests=1))
        wallet_days.count(conn, alice, at_ms=T0, charges=1_500_000_000, written_off=0)
        old_hold(conn, 903, alice, 1 * USD, "req_voided")
        old_entry(conn, 9031, "void", alice, 1 * USD, 903, "void:req_voided",
                  [(alice, "held", -1 * USD), (alice, "available", 1 * USD)])
        conn.execute(holds.update().where(holds.c.id == 903).values(status="voided",
                                                                     closed_at_ms=T0))
        conn.execute(accounts.update().where(accounts.c.id == alice).values(
            available_nano=accounts.c.available_nano + 1 * USD,
            held_nano=accounts.c.held_nano - 1 * USD))
        old_hold(conn, 904, alice, 500_000_000, "req_other")
    return alice


def balances(db: Database, account_id: int) -> tuple[int, int]:
    with db.read() as conn:
        account = get_account(conn, account_id)
    return account.available_nano, account.held_nano


def problems(db: Database) -> list[str]:
    with db.read() as conn:
        return verify(conn)


def kinds(db: Database) -> dict[str, int]:
    with db.read() as conn:
        return {str(k): int(n) for k, n in conn.execute(
            sa.select(entries.c.kind, sa.func.count()).group_by(entries.c.kind))}


def test_open_holds_booked_the_old_way_move_off_the_ledger(db: Database) -> None:
    downgrade(db, "0014_usage_bounds")
    assert current_revision(db) == "0014_usage_bounds"
    alice = book_the_old_way(db)
    # 10 - 3 - 2 + 0.5 - 1 + 1 - 0.5 available; 3 + 0.5 held (holds 901 and 904)
    assert balances(db, alice) == (5 * USD, 3_500_000_000)
    assert problems(db) == [(f"account {alice} (alice): stored balance 8.500000000 USD "
                            "(available 5.000000000 + held 3.500000000) but its postings sum "
                            "to 5.000000000 USD"),
                            (f"account {alice} (alice): 3.500000000 USD booked as held in the "
                            "ledger (holds are not booked there)")]

    upgrade(db)
    with db.read() as conn:  # the column and its unique index as tables.py declares them
        assert [d for d in compare_metadata(MigrationContext.configure(conn), metadata)
                if "holds" in repr(d)] == []
    assert problems(db) == []
    assert balances(db, alice) == (5 * USD, 3_500_000_000)  # stored balances do not move
    # one rebook entry per open hold, moving it back: held -amount, available +amount
    assert kinds(db) == {"topup": 1, "hold": 4, "settle": 1, "void": 1, "rebook": 2}
    with db.read() as conn:
        rebooked = conn.execute(
            sa.select(entries.c.hold_id, postings.c.bucket, postings.c.amount_nano)
            .join(postings, postings.c.entry_id == entries.c.id)
            .where(entries.c.kind == "rebook")
            .order_by(entries.c.hold_id, postings.c.amount_nano)).all()
        assert [tuple(r) for r in rebooked] == [
            (901, "held", -3 * USD), (901, "available", 3 * USD),
            (904, "held", -500_000_000), (904, "available", 500_000_000)]
        # every hold keeps the key it was placed under
        assert {k: ledger.hold_status(conn, k) for k in (
            "req_open", "req_settled", "req_voided", "req_other", "req_none")} == {
            "req_open": "open", "req_settled": "settled", "req_voided": "voided",
            "req_other": "open", "req_none": None}

    # the old open holds close the new way: one entry for the charge, nothing for the void
    with db.write() as conn:
        assert ledger.place_hold(conn, alice, 3 * USD, idempotency_key="req_open",
                                 ttl_ms=3_600_000, at_ms=T0).id == 901  # a repeat
        settled = ledger.settle_hold(conn, 901, 1 * USD, idempotency_key="req_open",
                                     at_ms=clock.now_ms())
        ledger.void_hold(conn, 904, at_ms=clock.now_ms())
    assert (settled.charged_nano, settled.released_nano) == (1 * USD, 2 * USD)
    assert balances(db, alice) == (7_500_000_000, 0)  # 10 - 1.5 - 1
    assert kinds(db) == {"topup": 1, "hold": 4, "settle": 2, "void": 1, "rebook": 2}
    assert problems(db) == []

    # a hold placed under the new code, still open at a downgrade, is booked the old way then
    with db.write() as conn:
        ledger.place_hold(conn, alice, 250_000_000, idempotency_key="req_new",
                          ttl_ms=3_600_000, at_ms=clock.now_ms())
    downgrade(db, "0014_usage_bounds")
    with db.read() as conn:
        held = conn.execute(sa.select(sa.func.sum(postings.c.amount_nano)).where(
            postings.c.account_id == alice, postings.c.bucket == "held")).scalar_one()
        assert held == 250_000_000
        columns = {c["name"] for c in sa.inspect(conn).get_columns("holds")}
        assert "idempotency_key" not in columns
    upgrade(db)
    assert problems(db) == []
    assert balances(db, alice) == (7_250_000_000, 250_000_000)
    with db.read() as conn:
        assert ledger.hold_status(conn, "req_new") == "open"
