"""promotional credit in statements, and codes whose credit expires

Revision ID: 0012_promo_credit
Revises: 0011_channels

``wallet_days`` gains ``grants_nano`` and ``grants_expired_nano`` (promotional credit granted
and taken back that day, no longer counted in ``adjustments_nano``) and ``promo_end_nano``
(the wallet's promotional part after the day's last movement), so a statement splits paid
and promotional balance from a few rows. ``redemption_codes.credit_days``: how long the
credit a code grants stays valid (NULL: for ever).

Earlier rows are filled from the ledger: grant and expiry entries move out of the day's
adjustments, and the promotional part of each day is replayed from the entries of accounts
that ever had a grant (spending takes it first, as the settlement does).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0012_promo_credit'
down_revision: str | Sequence[str] | None = '0011_channels'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DAY_MS = 86_400_000


def upgrade() -> None:
    with op.batch_alter_table('wallet_days') as batch:
        for name in ('grants_nano', 'grants_expired_nano', 'promo_end_nano'):
            batch.add_column(sa.Column(name, sa.BigInteger(), server_default='0',
                                       nullable=False))
    with op.batch_alter_table('redemption_codes') as batch:
        batch.add_column(sa.Column('credit_days', sa.Integer(), nullable=True))
    _backfill(op.get_bind())


def _backfill(conn: sa.Connection) -> None:
    accounts = [int(r[0]) for r in conn.execute(sa.text(
        "SELECT DISTINCT account_id FROM entries WHERE kind IN ('grant', 'grant_expire')"))]
    for account_id in accounts:
        promo = total = 0
        ends: dict[int, int] = {}
        grants: dict[int, tuple[int, int]] = {}
        rows = conn.execute(sa.text(
            "SELECT e.id, e.kind, e.amount_nano, e.created_at_ms, "
            "COALESCE(SUM(p.amount_nano), 0) FROM entries e LEFT JOIN postings p "
            "ON p.entry_id = e.id AND p.account_id = e.account_id "
            "WHERE e.account_id = :a GROUP BY e.id, e.kind, e.amount_nano, e.created_at_ms "
            "ORDER BY e.id"), {"a": account_id})
        for _, kind, amount, at_ms, moved in rows:
            day = int(at_ms) - int(at_ms) % DAY_MS
            total += int(moved)
            if kind == 'grant':
                promo += int(amount)
                g, x = grants.get(day, (0, 0))
                grants[day] = (g + int(amount), x)
            elif kind == 'grant_expire':
                promo -= int(amount)
                g, x = grants.get(day, (0, 0))
                grants[day] = (g, x + int(amount))
            elif kind == 'settle':
                promo += int(moved)  # what the wallet paid: -(its postings)
            promo = max(0, min(promo, total))
            ends[day] = promo
        days = [int(r[0]) for r in conn.execute(sa.text(
            "SELECT day_ms FROM wallet_days WHERE account_id = :a ORDER BY day_ms"),
            {"a": account_id})]
        last = 0
        for day in days:
            last = ends.get(day, last)
            granted, expired = grants.get(day, (0, 0))
            conn.execute(sa.text(
                "UPDATE wallet_days SET promo_end_nano = :p, grants_nano = :g, "
                "grants_expired_nano = :x, adjustments_nano = adjustments_nano - :g + :x "
                "WHERE account_id = :a AND day_ms = :d"),
                {"p": last, "g": granted, "x": expired, "a": account_id, "d": day})


def downgrade() -> None:
    op.execute('UPDATE wallet_days SET adjustments_nano = adjustments_nano + grants_nano '
               '- grants_expired_nano')
    with op.batch_alter_table('redemption_codes') as batch:
        batch.drop_column('credit_days')
    with op.batch_alter_table('wallet_days') as batch:
        for name in ('promo_end_nano', 'grants_expired_nano', 'grants_nano'):
            batch.drop_column(name)
