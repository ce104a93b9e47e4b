"""tiers, rate limits, key spend caps, IP allowlists

Revision ID: 0004
Revises: 0003

Additive only: new tables (tiers, key_spend) and new nullable or defaulted columns on
accounts, api_keys (limits, the key's current rate-limit window) and holds. ``api_keys.open_holds`` starts at each key's count of
open holds, so the holds open during the upgrade close it back to exactly zero.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('tiers',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('rpm', sa.BigInteger(), nullable=False),
    sa.Column('tpm', sa.BigInteger(), nullable=False),
    sa.Column('concurrency', sa.BigInteger(), nullable=False),
    sa.Column('upgrade_at_nano', sa.BigInteger(), nullable=True),
    sa.Column('is_default', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('key_spend',
    sa.Column('key_id', Id, nullable=False),
    sa.Column('period', sa.String(length=8), nullable=False),
    sa.Column('period_start_ms', sa.BigInteger(), nullable=False),
    sa.Column('spent_nano', sa.BigInteger(), nullable=False),
    sa.Column('held_nano', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('held_nano >= 0', name='ck_key_spend_held_nonnegative'),
    sa.ForeignKeyConstraint(['key_id'], ['api_keys.id'], ),
    sa.PrimaryKeyConstraint('key_id', 'period', 'period_start_ms')
    )
    with op.batch_alter_table('accounts') as batch:
        batch.add_column(sa.Column('tier', sa.String(length=64), nullable=True))
    with op.batch_alter_table('api_keys') as batch:
        batch.add_column(sa.Column('rpm', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('tpm', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('concurrency', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('daily_cap_nano', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('weekly_cap_nano', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('monthly_cap_nano', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('allowed_ips', sa.Text(), nullable=True))
        batch.add_column(sa.Column('open_holds', sa.BigInteger(), server_default='0',
                                   nullable=False))
        for name in ('window_start_ms', 'window_requests', 'window_tokens'):
            batch.add_column(sa.Column(name, sa.BigInteger(), server_default='0',
                                       nullable=False))
    with op.batch_alter_table('holds') as batch:
        batch.add_column(sa.Column('cap_periods', sa.SmallInteger(), server_default='0',
                                   nullable=False))
    op.create_index('ix_holds_key_open', 'holds', ['key_id', 'status'], unique=False)
    op.execute("UPDATE api_keys SET open_holds = (SELECT count(*) FROM holds "
               "WHERE holds.key_id = api_keys.id AND holds.status = 'open')")


def downgrade() -> None:
    """Downgrade schema. Columns are dropped in place (SQLite 3.35+): recreating a table that
    other tables reference fails their foreign keys once it holds data."""
    op.drop_index('ix_holds_key_open', table_name='holds')
    with op.batch_alter_table('holds', recreate='never') as batch:
        batch.drop_column('cap_periods')
    with op.batch_alter_table('api_keys', recreate='never') as batch:
        for name in ('window_tokens', 'window_requests', 'window_start_ms',
                     'open_holds', 'allowed_ips', 'monthly_cap_nano', 'weekly_cap_nano',
                     'daily_cap_nano', 'concurrency', 'tpm', 'rpm'):
            batch.drop_column(name)
    with op.batch_alter_table('accounts', recreate='never') as batch:
        batch.drop_column('tier')
    op.drop_table('key_spend')
    op.drop_table('tiers')
