"""IMAP mode: watched folders' UIDVALIDITY and last UID, messages waiting to be filed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 14:15:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'imap_mailboxes',
        sa.Column('mailbox', sa.String(length=500), nullable=False),
        sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
        sa.Column('last_uid', sa.BigInteger(), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('mailbox', name=op.f('pk_imap_mailboxes')),
    )
    op.create_table(
        'imap_filing',
        sa.Column('mailbox', sa.String(length=500), nullable=False),
        sa.Column('uidvalidity', sa.BigInteger(), nullable=False),
        sa.Column('uid', sa.BigInteger(), nullable=False),
        sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ['message_id'], ['messages.id'],
            name=op.f('fk_imap_filing_message_id_messages'), ondelete='CASCADE',
        ),
        sa.PrimaryKeyConstraint('mailbox', 'uidvalidity', 'uid', name=op.f('pk_imap_filing')),
    )
    with op.batch_alter_table('imap_filing', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_imap_filing_message_id'), ['message_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('imap_filing', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_imap_filing_message_id'))
    op.drop_table('imap_filing')
    op.drop_table('imap_mailboxes')
