"""Migration 0014_usage_bounds on SQLite and PostgreSQL: it matches the tables (tool fees and
per-quality prices on price versions, tool calls on usage records, the Responses memory), and
it goes down to 0013 and back up."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from tollway.store.db import Database
from tollway.store.migrate import alembic_config, current_revision, head_revision, upgrade
from tollway.store.tables import metadata

TOUCHED = ("price_versions", "usage_records", "response_memory")


def test_0014_matches_the_tables_and_downgrades(db: Database) -> None:
    with db.read() as conn:
        assert current_revision(db) == head_revision() == "0014_usage_bounds"
        assert [d for d in compare_metadata(MigrationContext.configure(conn), metadata)
                if any(name in repr(d) for name in TOUCHED)] == []
    config = alembic_config()
    with db.write() as conn:
        config.attributes["connection"] = conn
        command.downgrade(config, "0013_auto_recharge")
    with db.read() as conn:
        inspector = sa.inspect(conn)
        assert "response_memory" not in inspector.get_table_names()
        assert "tool_calls" not in {c["name"] for c in inspector.get_columns("usage_records")}
        assert {"tool_calls_nano", "per_quality_nano"}.isdisjoint(
            c["name"] for c in inspector.get_columns("price_versions"))
    upgrade(db)
    with db.read() as conn:
        assert current_revision(db) == head_revision()
        assert [d for d in compare_metadata(MigrationContext.configure(conn), metadata)
                if any(name in repr(d) for name in TOUCHED)] == []
