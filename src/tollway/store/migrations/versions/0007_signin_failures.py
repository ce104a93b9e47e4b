"""sign-in throttle: failed console sign-ins

Revision ID: 0007
Revises: 0006

Additive only. ``signin_failures`` holds one row per failed console sign-in and scope
(``login:<login>`` or ``ip:<client address>``) with its time in ms, so the throttle is shared
by every worker and instance on the database. Rows older than the window are deleted as new
failures arrive.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Id = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('signin_failures',
    sa.Column('id', Id, sa.Identity(always=False, start=101), nullable=False),
    sa.Column('scope', sa.String(length=400), nullable=False),
    sa.Column('at_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_signin_failures_scope', 'signin_failures', ['scope', 'at_ms'], unique=False)
    op.create_index('ix_signin_failures_time', 'signin_failures', ['at_ms'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_signin_failures_time', table_name='signin_failures')
    op.drop_index('ix_signin_failures_scope', table_name='signin_failures')
    op.drop_table('signin_failures')
