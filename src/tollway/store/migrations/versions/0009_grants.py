"""grants: promotional credit with an optional expiry

Revision ID: 0009_grants
Revises: 0008_payments

Additive only. ``accounts.promo_nano`` is the promotional part of a wallet (spent first, in
the settlement's own UPDATE); ``promo_grants`` holds each grant with what it has left.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0009_grants'
down_revision: str | Sequence[str] | None = '0008_payments'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    with op.batch_alter_table('accounts') as batch:
        batch.add_column(sa.Column('promo_nano', sa.BigInteger(), server_default='0',
                                   nullable=False))
    op.create_table('promo_grants',
    sa.Column('id', Id, sa.Identity(always=False, start=101), nullable=False),
    sa.Column('account_id', Id, nullable=False),
    sa.Column('amount_nano', sa.BigInteger(), nullable=False),
    sa.Column('remaining_nano', sa.BigInteger(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('closed_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('expired_nano', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('entry_id', Id, nullable=True),
    sa.CheckConstraint('amount_nano > 0', name='ck_promo_grants_amount_positive'),
    sa.CheckConstraint('remaining_nano >= 0', name='ck_promo_grants_remaining_nonnegative'),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['entry_id'], ['entries.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_promo_grants_account', 'promo_grants', ['account_id', 'closed_at_ms'],
                    unique=False)
    op.create_index('ix_promo_grants_due', 'promo_grants', ['closed_at_ms', 'expires_at_ms'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_promo_grants_due', table_name='promo_grants')
    op.drop_index('ix_promo_grants_account', table_name='promo_grants')
    op.drop_table('promo_grants')
    # plain ALTER TABLE (SQLite >= 3.35): a batch copy of accounts would trip the foreign keys
    # other tables hold on it
    op.execute('ALTER TABLE accounts DROP COLUMN promo_nano')
