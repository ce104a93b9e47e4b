"""notifications (low-balance threshold, settings, outbox, deliveries, attempts) and
redemption codes

Revision ID: 0005
Revises: 0002

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def _id() -> sa.Column[int]:
    return sa.Column('id', Id, sa.Identity(always=False, start=101), nullable=False,
                     primary_key=True)


def upgrade() -> None:
    """Upgrade schema (additive: new columns with defaults, new tables)."""
    op.add_column('accounts', sa.Column('low_balance_nano', sa.BigInteger(), nullable=True))
    op.add_column('accounts', sa.Column('low_balance_armed', sa.Boolean(),
                                        server_default=sa.false(), nullable=False))
    op.create_table(
        'notification_settings',
        sa.Column('account_id', Id, sa.ForeignKey('accounts.id'), primary_key=True),
        sa.Column('webhook_url', sa.Text(), nullable=True),
        sa.Column('webhook_secret', sa.String(80), nullable=False),
        sa.Column('email', sa.String(320), nullable=True),
        sa.Column('updated_at_ms', sa.BigInteger(), nullable=False))
    op.create_table(
        'notification_events',
        _id(),
        sa.Column('public_id', sa.String(40), nullable=False, unique=True),
        sa.Column('dedupe_key', sa.String(80), nullable=True, unique=True),
        sa.Column('account_id', Id, sa.ForeignKey('accounts.id'), nullable=False),
        sa.Column('type', sa.String(32), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False))
    op.create_index('ix_notification_events_account', 'notification_events',
                    ['account_id', 'id'])
    op.create_table(
        'notification_deliveries',
        _id(),
        sa.Column('event_id', Id, sa.ForeignKey('notification_events.id'), nullable=False),
        sa.Column('channel', sa.String(16), nullable=False),
        sa.Column('status', sa.String(16), nullable=False),
        sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
        sa.Column('next_attempt_at_ms', sa.BigInteger(), nullable=False),
        sa.Column('claimed_until_ms', sa.BigInteger(), nullable=True),
        sa.Column('claim_token', sa.String(40), nullable=True),
        sa.Column('delivered_at_ms', sa.BigInteger(), nullable=True))
    op.create_index('ix_notification_deliveries_event_id', 'notification_deliveries',
                    ['event_id'])
    op.create_index('ix_notification_deliveries_due', 'notification_deliveries',
                    ['status', 'next_attempt_at_ms'])
    op.create_table(
        'notification_attempts',
        _id(),
        sa.Column('delivery_id', Id, sa.ForeignKey('notification_deliveries.id'),
                  nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('target', sa.Text(), nullable=True),
        sa.Column('started_at_ms', sa.BigInteger(), nullable=False),
        sa.Column('duration_ms', sa.Integer(), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.UniqueConstraint('delivery_id', 'attempt', name='uq_notification_attempts'))
    op.create_table(
        'redemption_codes',
        _id(),
        sa.Column('code_hash', sa.String(64), nullable=False, unique=True),
        sa.Column('hint', sa.String(8), nullable=False),
        sa.Column('amount_nano', sa.BigInteger(), nullable=False),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
        sa.Column('expires_at_ms', sa.BigInteger(), nullable=True),
        sa.Column('revoked_at_ms', sa.BigInteger(), nullable=True),
        sa.Column('redeemed_by', Id, sa.ForeignKey('accounts.id'), nullable=True),
        sa.Column('redeemed_at_ms', sa.BigInteger(), nullable=True),
        sa.Column('entry_id', Id, sa.ForeignKey('entries.id'), nullable=True),
        sa.CheckConstraint('amount_nano > 0', name='ck_redemption_codes_amount_positive'))
    op.create_index('ix_redemption_codes_created', 'redemption_codes',
                    ['created_at_ms', 'id'])


def downgrade() -> None:
    """Downgrade schema. Columns are dropped in place (SQLite 3.35+): recreating a table that
    other tables reference fails their foreign keys once it holds data."""
    op.drop_table('redemption_codes')
    op.drop_table('notification_attempts')
    op.drop_table('notification_deliveries')
    op.drop_table('notification_events')
    op.drop_table('notification_settings')
    with op.batch_alter_table('accounts', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('low_balance_armed')
        batch_op.drop_column('low_balance_nano')
