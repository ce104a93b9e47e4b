"""The operator's enable/disable per channel, read by every worker with the catalog."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from tollway.store.tables import channel_states


def disabled_channels(conn: Connection) -> set[str]:
    return {r.id for r in conn.execute(sa.select(channel_states.c.id)
                                       .where(channel_states.c.enabled.is_(False)))}


def set_enabled(conn: Connection, channel_id: str, enabled: bool, *, at_ms: int) -> None:
    updated = conn.execute(channel_states.update().where(channel_states.c.id == channel_id)
                           .values(enabled=enabled, updated_at_ms=at_ms)).rowcount
    if not updated:
        conn.execute(channel_states.insert().values(id=channel_id, enabled=enabled,
                                                    updated_at_ms=at_ms))
