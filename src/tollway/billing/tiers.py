"""Account tiers: which rate limits an account's keys get.

An account without a tier has the catalog's default tier. A top-up that brings the account's
cumulative top-ups to a tier's ``tier_upgrades`` threshold moves it up to that tier, in the
top-up's own transaction; nothing ever moves an account down except the operator
(``tollway accounts set-tier``).
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

from tollway.errors import InvalidRequest
from tollway.store import accounts as store
from tollway.store.accounts import Account
from tollway.store.catalog import list_tiers


def set_tier(conn: Connection, account_ref: str | int, tier: str | None) -> Account:
    """The operator's choice, up or down; None returns the account to the default tier."""
    account = store.find_account(conn, account_ref)
    if tier is not None:
        names = [t.name for t in list_tiers(conn)[0]]
        if tier not in names:
            raise InvalidRequest(f"unknown tier {tier!r} (tiers: "
                                 f"{', '.join(names) or 'none in the catalog'})")
    return store.set_tier(conn, account.id, tier)


def upgrade_after_topup(conn: Connection, account_id: int) -> str | None:
    """Move the account up to the highest tier whose threshold its cumulative top-ups reach,
    if that is above its tier; returns the new tier's name, or None if nothing changed."""
    tiers, default = list_tiers(conn)
    if not any(t.upgrade_at_nano is not None for t in tiers):
        return None
    rank = {t.name: i for i, t in enumerate(tiers)}
    account = store.get_account(conn, account_id)
    current = rank.get(account.tier or "", rank.get(default or "", 0))
    total = store.cumulative_topups(conn, account_id)
    reached = [i for i, t in enumerate(tiers)
               if t.upgrade_at_nano is not None and t.upgrade_at_nano <= total]
    if not reached or max(reached) <= current:
        return None
    name = tiers[max(reached)].name
    store.set_tier(conn, account_id, name)
    return name
