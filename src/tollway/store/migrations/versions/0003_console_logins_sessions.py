"""console logins (account email, password hash, disabled) and web sessions

Revision ID: 0003
Revises: 0002

"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: str | Sequence[str] | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    """Upgrade schema (additive: new nullable columns and a new table). Email uniqueness is a
    unique index, not a table constraint, so neither direction recreates ``accounts`` on SQLite
    (recreating a table other tables reference fails their foreign keys once it holds data)."""
    op.add_column('accounts', sa.Column('email', sa.String(length=320), nullable=True))
    op.add_column('accounts', sa.Column('password_hash', sa.String(length=255), nullable=True))
    op.add_column('accounts', sa.Column('disabled_at_ms', sa.BigInteger(), nullable=True))
    op.create_index('uq_accounts_email', 'accounts', ['email'], unique=True)
    op.create_table('web_sessions',
    sa.Column('id_hash', sa.String(length=64), nullable=False),
    sa.Column('account_id', Id, nullable=True),
    sa.Column('operator', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at_ms', sa.BigInteger(), nullable=False),
    sa.Column('expires_at_ms', sa.BigInteger(), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ),
    sa.PrimaryKeyConstraint('id_hash')
    )
    op.create_index('ix_web_sessions_account', 'web_sessions', ['account_id'], unique=False)
    op.create_index('ix_web_sessions_expiry', 'web_sessions', ['expires_at_ms'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index('ix_web_sessions_expiry', table_name='web_sessions')
    op.drop_index('ix_web_sessions_account', table_name='web_sessions')
    op.drop_table('web_sessions')
    op.drop_index('uq_accounts_email', table_name='accounts')
    with op.batch_alter_table('accounts', recreate='never') as batch:
        batch.drop_column('disabled_at_ms')
        batch.drop_column('password_hash')
        batch.drop_column('email')
