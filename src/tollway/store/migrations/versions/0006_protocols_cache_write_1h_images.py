"""protocols: 1-hour cache writes, per-size image prices

Revision ID: 0006
Revises: 0002

Additive only. ``price_versions.cache_write_1h_nano_per_1m`` prices 1-hour cache writes
(Anthropic) apart from 5-minute ones; ``price_versions.per_size_nano`` holds an image model's
per-size prices as JSON ``{"1024x1024": nano-USD}`` (prices are versioned, so they live with
the price, not in the item spec). Usage records keep the 1-hour write tokens and the price
applied to them; the hourly rollups count them.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('price_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cache_write_1h_nano_per_1m', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('per_size_nano', sa.Text(), nullable=True))
    with op.batch_alter_table('usage_records', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cache_write_1h_tokens', sa.BigInteger(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('cache_write_1h_nano_per_1m', sa.BigInteger(), nullable=True))
    with op.batch_alter_table('usage_rollups', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cache_write_1h_tokens', sa.BigInteger(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('usage_rollups', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('cache_write_1h_tokens')
    with op.batch_alter_table('usage_records', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('cache_write_1h_nano_per_1m')
        batch_op.drop_column('cache_write_1h_tokens')
    with op.batch_alter_table('price_versions', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('per_size_nano')
        batch_op.drop_column('cache_write_1h_nano_per_1m')
