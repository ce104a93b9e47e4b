"""security ends: who pinned a key's group; notification retention index

Revision ID: 0010_security
Revises: 0009_grants

``api_keys.group_pinned_by`` records who pinned a key to a price group. Only ``operator``
pins count when a key is charged: a customer may no longer pin (the console refused it from
this release on), and a key pinned before this revision is trusted only when its account has
no console login (then only the operator, through the CLI or the admin API, can have made
it). A pinned key of an account with a console login may have been pinned by the customer
through the console's key form: it is marked ``customer`` and charged at the account's group
until the operator pins it again (``tollway keys update KEY_ID --group G``).

``ix_notification_events_created`` lets old notifications be pruned by time
(``TOLLWAY_NOTIFY_RETENTION_DAYS``).
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0010_security'
down_revision: str | Sequence[str] | None = '0009_grants'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('group_pinned_by', sa.String(length=16), nullable=True))
    op.execute(
        "UPDATE api_keys SET group_pinned_by = CASE WHEN EXISTS (SELECT 1 FROM accounts a "
        "WHERE a.id = api_keys.account_id AND (a.password_hash IS NOT NULL OR a.email IS NOT "
        "NULL)) THEN 'customer' ELSE 'operator' END WHERE group_name IS NOT NULL")
    op.create_index('ix_notification_events_created', 'notification_events',
                    ['created_at_ms'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_notification_events_created', table_name='notification_events')
    with op.batch_alter_table('api_keys', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('group_pinned_by')
