"""usage bounds: server-side tool fees, per-quality image prices, stateful Responses memory

Revision ID: 0014_usage_bounds
Revises: 0013_auto_recharge

Additive only. ``price_versions`` gains ``tool_calls_nano`` (JSON {tool: nano-USD per call})
and ``per_quality_nano`` (JSON {quality: nano-USD per image}); ``usage_records`` gains
``tool_calls`` (JSON {tool: {calls, nano_per_call}}), all NULL on earlier rows.
``response_memory`` keeps each relayed Responses id with its account and the input + output
tokens it billed (the history a ``previous_response_id`` continues).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0014_usage_bounds'
down_revision: str | Sequence[str] | None = '0013_auto_recharge'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('response_memory',
    sa.Column('response_id', sa.String(length=255), nullable=False),
    sa.Column('account_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
              nullable=False),
    sa.Column('context_tokens', sa.BigInteger(), nullable=False),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('response_id')
    )
    with op.batch_alter_table('price_versions') as batch:
        batch.add_column(sa.Column('tool_calls_nano', sa.Text(), nullable=True))
        batch.add_column(sa.Column('per_quality_nano', sa.Text(), nullable=True))
    with op.batch_alter_table('usage_records') as batch:
        batch.add_column(sa.Column('tool_calls', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('usage_records', recreate='never') as batch:
        batch.drop_column('tool_calls')
    with op.batch_alter_table('price_versions', recreate='never') as batch:
        batch.drop_column('per_quality_nano')
        batch.drop_column('tool_calls_nano')
    op.drop_table('response_memory')
