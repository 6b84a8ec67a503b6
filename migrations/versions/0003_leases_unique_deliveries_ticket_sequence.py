"""leases on messages, one row per delivery, ticket numbers from a sequence

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 12:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    # Keep Message-IDs short enough for the unique index, and make earlier rows
    # that would collide distinct (they were stored twice by a race).
    op.execute("UPDATE messages SET message_id = substr(message_id, 1, 500)")
    op.execute(
        "UPDATE messages SET message_id = substr(message_id, 1, 480) || '#dup' || id "
        "WHERE id NOT IN (SELECT min(id) FROM messages GROUP BY raw_sha256, message_id)"
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('claimed_until', sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_index('ix_messages_raw_sha256')
        batch_op.create_unique_constraint('uq_messages_delivery', ['raw_sha256', 'message_id'])
    if bind.dialect.name == 'postgresql':
        start = bind.execute(
            sa.text(
                "SELECT greatest((SELECT coalesce(max(number), 0) FROM tickets), "
                "(SELECT coalesce(max(value), 0) FROM counters WHERE name = 'ticket_number'))"
            )
        ).scalar()
        op.execute(f"CREATE SEQUENCE ticket_numbers START WITH {int(start or 0) + 1}")


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        op.execute("DROP SEQUENCE IF EXISTS ticket_numbers")
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_constraint('uq_messages_delivery', type_='unique')
        batch_op.create_index('ix_messages_raw_sha256', ['raw_sha256'], unique=False)
        batch_op.drop_column('claimed_until')
        batch_op.drop_column('claimed_by')
