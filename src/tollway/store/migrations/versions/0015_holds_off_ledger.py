"""holds off the ledger: a hold is a reservation on its row, one ledger entry at settlement

Revision ID: 0015_holds_off_ledger
Revises: 0014_usage_bounds

Before this revision a hold booked an entry (wallet available -> wallet held) and its close
booked the reverse beside the charge. From here on a hold lives on ``holds`` and
``accounts.held_nano`` only, the settlement books one entry (the charge) and a void or expiry
books nothing; ``ledger verify`` checks that every wallet's ``held`` bucket sums to zero and its
``available`` bucket to its whole balance (available + held).

- ``holds.idempotency_key`` (unique): the key a hold was placed under, which its ledger entry
  carried until now (``hold:KEY``). Filled in for every hold that has such an entry.
- Every hold still open was booked available -> held. One ``rebook`` entry per open hold moves
  it back (held -amount, available +amount), so the wallet's postings say what the new code
  expects; stored balances do not change (``held_nano`` already counts the open holds).

Downgrade books the holds open at that time back into the held bucket (a ``hold`` entry each,
for those placed after the upgrade; the ``rebook`` entries of the others are deleted) and drops
the column. Holds voided or expired under the new code have no closing entry, which the older
``ledger verify`` reports: downgrading is for emergencies.
"""
import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0015_holds_off_ledger'
down_revision: str | Sequence[str] | None = '0014_usage_bounds'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OPEN_BOOKED = ("FROM holds WHERE holds.status = 'open' AND EXISTS (SELECT 1 FROM entries "
                "WHERE entries.hold_id = holds.id AND entries.kind = 'hold')")


def _postings_of(kind: str, first: str, second: str) -> str:
    """Two postings per ``kind`` entry that has none yet: ``first`` bucket -amount, ``second``
    bucket +amount."""
    new = (f"FROM entries WHERE kind = '{kind}' AND NOT EXISTS (SELECT 1 FROM postings "
           "WHERE postings.entry_id = entries.id)")
    return ("INSERT INTO postings (entry_id, account_id, bucket, amount_nano) "
            f"SELECT id, account_id, '{first}', -amount_nano {new} "
            f"UNION ALL SELECT id, account_id, '{second}', amount_nano {new}")


def upgrade() -> None:
    with op.batch_alter_table('holds') as batch:
        batch.add_column(sa.Column('idempotency_key', sa.String(length=255), nullable=True))
    op.execute("UPDATE holds SET idempotency_key = (SELECT substr(entries.idempotency_key, 6) "
               "FROM entries WHERE entries.hold_id = holds.id AND entries.kind = 'hold')")
    op.create_index('uq_holds_idempotency_key', 'holds', ['idempotency_key'], unique=True)
    now_ms = int(time.time() * 1000)
    op.execute(sa.text(
        "INSERT INTO entries (kind, account_id, amount_nano, hold_id, idempotency_key, note, "
        "created_at_ms) SELECT 'rebook', account_id, amount_nano, id, 'rebook:' || id, "
        "'migration 0015: the open hold moved off the ledger', :now " + _OPEN_BOOKED)
        .bindparams(now=now_ms))
    op.execute(_postings_of('rebook', 'held', 'available'))


def downgrade() -> None:
    now_ms = int(time.time() * 1000)
    op.execute("DELETE FROM postings WHERE entry_id IN (SELECT entries.id FROM entries "
               "JOIN holds ON holds.id = entries.hold_id "
               "WHERE entries.kind = 'rebook' AND holds.status = 'open')")
    op.execute("DELETE FROM entries WHERE kind = 'rebook' AND hold_id IN "
               "(SELECT id FROM holds WHERE status = 'open')")
    # placed under the new code: book them the old way, as entries of a kind of their own first
    op.execute(sa.text(
        "INSERT INTO entries (kind, account_id, amount_nano, hold_id, idempotency_key, "
        "created_at_ms) SELECT 'unrebook', account_id, amount_nano, id, "
        "'hold:' || coalesce(idempotency_key, 'unrebook:' || id), :now FROM holds "
        "WHERE holds.status = 'open' AND NOT EXISTS (SELECT 1 FROM entries "
        "WHERE entries.hold_id = holds.id AND entries.kind = 'hold')").bindparams(now=now_ms))
    op.execute(_postings_of('unrebook', 'available', 'held'))
    op.execute("UPDATE entries SET kind = 'hold' WHERE kind = 'unrebook'")
    op.drop_index('uq_holds_idempotency_key', table_name='holds')
    # plain ALTER TABLE (SQLite >= 3.35): a batch copy of holds would trip foreign keys
    op.execute('ALTER TABLE holds DROP COLUMN idempotency_key')
