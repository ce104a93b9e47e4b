"""payments: checkout orders and the provider events already handled

Revision ID: 0008_payments
Revises: 0007

Additive only. ``payment_orders`` holds one row per top-up checkout (account, amount,
currency, state, the provider's session and payment ids, what refunds and disputes took
back); ``payment_events`` one row per provider event handled, keyed by the provider's event
id, written in the same transaction as the money the event moved.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0008_payments'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('payment_orders',
    sa.Column('id', Id, sa.Identity(always=False, start=101), nullable=False),
    sa.Column('account_id', Id, nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('amount_nano', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('session_id', sa.String(length=255), nullable=True),
    sa.Column('payment_intent', sa.String(length=255), nullable=True),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('paid_at_ms', sa.BigInteger(), nullable=True),
    sa.Column('entry_id', Id, nullable=True),
    sa.Column('refunded_nano', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('disputed_nano', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('reversed_nano', sa.BigInteger(), server_default='0', nullable=False),
    sa.Column('written_off_nano', sa.BigInteger(), server_default='0', nullable=False),
    sa.CheckConstraint('amount_nano > 0', name='ck_payment_orders_amount_positive'),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.ForeignKeyConstraint(['entry_id'], ['entries.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('session_id')
    )
    op.create_index('ix_payment_orders_account', 'payment_orders', ['account_id', 'id'],
                    unique=False)
    op.create_index('ix_payment_orders_payment_intent', 'payment_orders', ['payment_intent'],
                    unique=False)
    op.create_table('payment_events',
    sa.Column('event_id', sa.String(length=255), nullable=False),
    sa.Column('type', sa.String(length=64), nullable=False),
    sa.Column('order_id', Id, nullable=True),
    sa.Column('outcome', sa.String(length=32), nullable=False),
    sa.Column('received_at_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['order_id'], ['payment_orders.id'], ),
    sa.PrimaryKeyConstraint('event_id')
    )


def downgrade() -> None:
    op.drop_table('payment_events')
    op.drop_index('ix_payment_orders_payment_intent', table_name='payment_orders')
    op.drop_index('ix_payment_orders_account', table_name='payment_orders')
    op.drop_table('payment_orders')
