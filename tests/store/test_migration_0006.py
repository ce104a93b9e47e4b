"""Migration 0006 on a database that already has usage: old records keep their cost and their
explanation (the new columns default to 0 tokens and no 1-hour price, which falls back to the
5-minute write price), on SQLite and PostgreSQL; and it downgrades cleanly."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command

from tollway.billing.reports import record_view
from tollway.store.db import Database
from tollway.store.migrate import alembic_config, current_revision, upgrade
from tollway.store.tables import usage_records


def downgrade(db: Database, revision: str) -> None:
    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, revision)


def test_records_written_before_0006_still_explain_themselves(db: Database) -> None:
    downgrade(db, "0002")
    assert current_revision(db) == "0002"
    with db.write() as conn:
        conn.exec_driver_sql(
            "INSERT INTO accounts (id, name, kind, group_name, created_at_ms) "
            "VALUES (501, 'old', 'customer', 'default', 1)")
        # 1000 prompt (200 cached, 100 written) and 50 output at 3 / 0.30 / 3.75 / 15 per 1M:
        # 700 × 3 + 200 × 0.30 + 100 × 3.75 + 50 × 15 = 2100 + 60 + 375 + 750 = 3285
        # per 1M = 3_285_000 nano
        conn.exec_driver_sql(
            "INSERT INTO usage_records (request_id, created_at_ms, account_id, ratio, "
            "ratio_source, type, billing_type, product, route, status, stream, input_tokens, "
            "cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, calls, "
            "input_nano_per_1m, output_nano_per_1m, cache_read_nano_per_1m, "
            "cache_write_nano_per_1m, cost_nano, credit_nano, usage_source) VALUES "
            "('req_old', 2, 501, '1', 'group', 'consume', 'token', 'claude', '/v1/chat/"
            "completions', 200, false, 1000, 200, 100, 50, 0, 0, 3000000000, 15000000000, "
            "300000000, 3750000000, 3285000, 0, 'upstream')")
    upgrade(db)
    with db.read() as conn:
        row = conn.execute(sa.select(usage_records)
                           .where(usage_records.c.request_id == "req_old")).one()
    assert (row.cache_write_1h_tokens, row.cache_write_1h_nano_per_1m) == (0, None)
    pricing = record_view(row)["pricing"]
    assert pricing["formula"] == ("((1000 − 200 − 100 − 0) × 3 + 200 × 0.3 + 100 × 3.75 + "
                                  "0 × 3.75 + 50 × 15) / 1000000 × 1 = 0.003285 → "
                                  "0.003285000 USD")
    assert pricing["rounded_usd"] == "0.003285000"

    downgrade(db, "0002")  # additive, so reversible
    with db.read() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("usage_records")}
    assert "cache_write_1h_tokens" not in columns and "cost_nano" in columns
    upgrade(db)
