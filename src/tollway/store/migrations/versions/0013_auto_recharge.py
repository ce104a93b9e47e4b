"""auto_recharge: a saved card charged when the balance falls below a threshold

Revision ID: 0013_auto_recharge
Revises: 0012_promo_credit

Additive only. ``accounts.recharge_threshold_nano`` and ``recharge_armed`` are read in the
RETURNING of the statements that move a wallet's money (no extra statement per request);
``auto_recharge`` holds each account's setting and saved card, ``recharge_attempts`` each
charge of it.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0013_auto_recharge'
down_revision: str | Sequence[str] | None = '0012_promo_credit'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    # plain ALTER TABLE ADD COLUMN: a batch copy of accounts (SQLite) would trip the foreign
    # keys other tables hold on it once they have rows
    op.add_column('accounts', sa.Column('recharge_threshold_nano', sa.BigInteger(),
                                        nullable=True))
    op.add_column('accounts', sa.Column('recharge_armed', sa.Boolean(),
                                        server_default=sa.false(), nullable=False))
    op.create_table('auto_recharge',
    sa.Column('account_id', Id, nullable=False),
    sa.Column('enabled', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('threshold_nano', sa.BigInteger(), nullable=True),
    sa.Column('target_nano', sa.BigInteger(), nullable=True),
    sa.Column('monthly_cap_nano', sa.BigInteger(), nullable=True),
    sa.Column('stripe_customer', sa.String(length=255), nullable=True),
    sa.Column('payment_method', sa.String(length=255), nullable=True),
    sa.Column('card_saved_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('failures', sa.Integer(), server_default='0', nullable=False),
    sa.Column('paused_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('in_flight_id', Id, nullable=True),
    sa.Column('updated_at_ms', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('target_nano > threshold_nano', name='ck_auto_recharge_target'),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('account_id'),
    sa.UniqueConstraint('stripe_customer')
    )
    op.create_table('recharge_attempts',
    sa.Column('id', Id, sa.Identity(always=False, start=101), nullable=False),
    sa.Column('account_id', Id, nullable=False),
    sa.Column('amount_nano', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('month_start_ms', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('payment_intent', sa.String(length=255), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('completed_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('entry_id', Id, nullable=True),
    sa.CheckConstraint('amount_nano > 0', name='ck_recharge_attempts_amount_positive'),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['entry_id'], ['entries.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('payment_intent')
    )
    op.create_index('ix_recharge_attempts_account', 'recharge_attempts',
                    ['account_id', 'month_start_ms'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_recharge_attempts_account', table_name='recharge_attempts')
    op.drop_table('recharge_attempts')
    op.drop_table('auto_recharge')
    # plain ALTER TABLE (SQLite >= 3.35): a batch copy of accounts would trip the foreign keys
    # other tables hold on it
    op.execute('ALTER TABLE accounts DROP COLUMN recharge_armed')
    op.execute('ALTER TABLE accounts DROP COLUMN recharge_threshold_nano')
