"""Daily wallet rollups: each movement of a wallet's total (available + held) counted in its
UTC day (top-ups, adjustments, charges, write-offs, promotional grants and their expiry), in
the transaction that moves it, so a statement of any day range reads a few rows instead of
every entry.

Each row also keeps the wallet's promotional part as it stands after the day's last movement
(``promo_end_nano``: ``accounts.promo_nano``, at most the wallet's total), read by a
subquery of the same statement, after the movement's own ``UPDATE`` of the account (whose
row lock orders concurrent movements). A statement's promotional spending is then what the
opening and closing snapshots, grants and expiries leave: the settlement needs no extra
statement to say how much of a charge was promotional."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ClauseElement

from tollway.store.prepared import Prepared
from tollway.store.tables import accounts, wallet_days

DAY_MS = 86_400_000
_ADDED = ("topups_nano", "adjustments_nano", "charges_nano", "written_off_nano", "grants_nano",
          "grants_expired_nano")


def _promo_now() -> sa.ScalarSelect[int]:
    """The wallet's promotional part, never more than its total."""
    a = accounts.c
    total = a.available_nano + a.held_nano
    return sa.select(sa.case((a.promo_nano > total, total), else_=a.promo_nano)).where(
        a.id == sa.bindparam("account_id")).scalar_subquery()


def _build(dialect: str) -> ClauseElement:
    insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
    values: dict[str, object] = {c: sa.bindparam(c) for c in ("account_id", "day_ms", *_ADDED)}
    values["promo_end_nano"] = _promo_now()
    stmt = insert(wallet_days).values(values)
    changes: dict[str, object] = {c: wallet_days.c[c] + stmt.excluded[c] for c in _ADDED}
    changes["promo_end_nano"] = stmt.excluded.promo_end_nano
    return stmt.on_conflict_do_update(index_elements=["account_id", "day_ms"], set_=changes)


_WALLET_DAY = Prepared(_build)


def count(conn: Connection, account_id: int, *, at_ms: int, topups: int = 0,
          adjustments: int = 0, charges: int = 0, written_off: int = 0, grants: int = 0,
          grants_expired: int = 0) -> None:
    """Count a movement booked at ``at_ms`` in the wallet's UTC day (call it after the
    movement's ``UPDATE`` of the account: the day keeps the promotional part it left)."""
    _WALLET_DAY.execute(conn, {"account_id": account_id, "day_ms": at_ms - at_ms % DAY_MS,
                               "topups_nano": topups, "adjustments_nano": adjustments,
                               "charges_nano": charges, "written_off_nano": written_off,
                               "grants_nano": grants, "grants_expired_nano": grants_expired})
