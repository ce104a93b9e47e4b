"""upstream channels: stored enable/disable, and the channel, attempts and upstream cost of
each usage record

Revision ID: 0011_channels
Revises: 0010_security

Additive only. ``channel_states`` holds the operator's enable/disable per channel id
(``ITEM/PROVIDER[#N]``); usage records gain ``channel``, ``attempts`` (JSON),
``upstream_cost_nano``, ``upstream_reported_cost_nano`` and ``upstream_cost_mismatch``, all
NULL on earlier rows.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0011_channels'
down_revision: str | Sequence[str] | None = '0010_security'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('channel_states',
    sa.Column('id', sa.String(length=300), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('updated_at_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('usage_records') as batch:
        batch.add_column(sa.Column('channel', sa.String(length=300), nullable=True))
        batch.add_column(sa.Column('attempts', sa.Text(), nullable=True))
        batch.add_column(sa.Column('upstream_cost_nano', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('upstream_reported_cost_nano', sa.BigInteger(),
                                   nullable=True))
        batch.add_column(sa.Column('upstream_cost_mismatch', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('usage_records', recreate='never') as batch:
        for name in ('upstream_cost_mismatch', 'upstream_reported_cost_nano',
                     'upstream_cost_nano', 'attempts', 'channel'):
            batch.drop_column(name)
    op.drop_table('channel_states')
