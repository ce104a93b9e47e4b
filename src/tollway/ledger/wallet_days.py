"""Daily wallet rollups: each movement of a wallet's total (available + held) counted in its
UTC day (top-ups, adjustments, charges, write-offs), in the transaction that moves it, so a
statement of any day range reads a few rows instead of every entry."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from tollway.store.prepared import upsert
from tollway.store.tables import wallet_days

DAY_MS = 86_400_000
_WALLET_DAY = upsert(wallet_days, ("account_id", "day_ms"),
                     add=("topups_nano", "adjustments_nano", "charges_nano", "written_off_nano"))


def count(conn: Connection, account_id: int, *, at_ms: int, topups: int = 0,
          adjustments: int = 0, charges: int = 0, written_off: int = 0) -> None:
    """Count a movement booked at ``at_ms`` in the wallet's UTC day."""
    _WALLET_DAY.execute(conn, {"account_id": account_id, "day_ms": at_ms - at_ms % DAY_MS,
                               "topups_nano": topups, "adjustments_nano": adjustments,
                               "charges_nano": charges, "written_off_nano": written_off})
