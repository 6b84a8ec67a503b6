"""The database schema: directory, tickets, messages, tokens, outbox, audit.

Raw messages are stored as bytes exactly as received (NUL bytes and 8-bit
included). Times are UTC. Migrations in `migrations/` must match these models;
a test runs Alembic's autogenerate comparison against them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every back end (SQLite keeps none)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


Id = BigInteger().with_variant(Integer(), "sqlite")


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    lang: Mapped[str] = mapped_column(String(8), default="pl")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Address(Base):
    """An address declared on an account: primary, technical or additional."""

    __tablename__ = "addresses"
    __table_args__ = (UniqueConstraint("account_id", "email"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(320), index=True)
    role: Mapped[str] = mapped_column(String(16))


class Service(Base):
    __tablename__ = "services"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(200), default="")


class Share(Base):
    """A contact given access to one service ("Udostępnianie usług")."""

    __tablename__ = "shares"
    __table_args__ = (UniqueConstraint("service_id", "email"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    service_id: Mapped[str] = mapped_column(
        ForeignKey("services.id", ondelete="CASCADE"), index=True
    )
    email: Mapped[str] = mapped_column(String(320), index=True)


# On PostgreSQL ticket numbers come from this sequence (several instances take
# numbers without a lock); SQLite, one instance, uses the counter row.
TICKET_NUMBERS = Sequence("ticket_numbers", metadata=Base.metadata)


class Counter(Base):
    """Monotonic counters (ticket numbers on SQLite): never reused, also after erasure."""

    __tablename__ = "counters"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)


class Ticket(Base):
    __tablename__ = "tickets"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    number: Mapped[int] = mapped_column(BigInteger, unique=True)
    code_nonce: Mapped[bytes] = mapped_column(LargeBinary(32))
    account_id: Mapped[str | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), index=True
    )
    service_id: Mapped[str | None] = mapped_column(
        ForeignKey("services.id", ondelete="SET NULL"), index=True
    )
    state: Mapped[str] = mapped_column(String(16), default="open")
    authorization: Mapped[str] = mapped_column(String(16))
    channel: Mapped[str] = mapped_column(String(16))
    requester: Mapped[str | None] = mapped_column(String(320), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    lang: Mapped[str] = mapped_column(String(8), default="pl")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Retention: when its personal data was removed (number, code, dates and
    # decisions stay, for claims); a follow-up to it opens a new ticket.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


MESSAGE_ID_LIMIT = 500  # of the Message-ID kept for duplicate detection (fits an index)


class Message(Base):
    """One received message: raw bytes first, the verdict once classified.

    (raw SHA-256, Message-ID) is unique: a delivery repeated by the MTA, by
    IMAP or by another instance is stored once, whoever gets it first.
    """

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_state_next", "state", "next_attempt_at"),
        UniqueConstraint("raw_sha256", "message_id", name="uq_messages_delivery"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    ticket_id: Mapped[int | None] = mapped_column(
        ForeignKey("tickets.id", ondelete="SET NULL"), index=True
    )
    channel: Mapped[str] = mapped_column(String(16))
    mail_from: Mapped[str] = mapped_column(String(512), default="")
    rcpt_to: Mapped[list[str]] = mapped_column(JSON, default=list)
    peer: Mapped[str] = mapped_column(String(128), default="")
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    raw_sha256: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[str] = mapped_column(String(998), default="", index=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # received -> processed, or dead after processing.max_attempts failures. A
    # worker claims received messages with a lease; an expired lease is free again.
    state: Mapped[str] = mapped_column(String(16), default="received")
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    from_address: Mapped[str | None] = mapped_column(String(320), index=True)
    subject: Mapped[str] = mapped_column(Text, default="")
    headers: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    defects: Mapped[list[str]] = mapped_column(JSON, default=list)
    decision: Mapped[str | None] = mapped_column(String(16))
    reasons: Mapped[list[str]] = mapped_column(JSON, default=list)
    rules_hit: Mapped[list[str]] = mapped_column(JSON, default=list)
    sender_role: Mapped[str | None] = mapped_column(String(16))
    account_id: Mapped[str | None] = mapped_column(String(64))
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # A report (bounce, delay) sent to the signed envelope sender of this outbox row.
    outbox_ref: Mapped[int | None] = mapped_column(BigInteger, index=True)
    # Automatic mail this message would have caused but that was not sent, and why
    # ("auth_request:recipient_rate_limit"): staff see it on the message.
    suppressed: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Retention or erasure blanked its personal data; raw_sha256, dates and the
    # decision remain as the claims record.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuthToken(Base):
    """An authorization link; only the SHA-256 of the token is kept."""

    __tablename__ = "auth_tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    ticket_id: Mapped[int] = mapped_column(ForeignKey("tickets.id", ondelete="CASCADE"), index=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    email: Mapped[str] = mapped_column(String(320))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The mail that carries the link: a returned copy of it burns the token.
    outbox_id: Mapped[int | None] = mapped_column(
        ForeignKey("outbox.id", ondelete="SET NULL"), index=True
    )


class OutboxItem(Base):
    """One outbound mail, committed with the decision that caused it."""

    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_state_next", "state", "next_attempt_at"),
        Index("ix_outbox_recipient_created", "recipient", "created_at"),
        Index("ix_outbox_kind_created", "kind", "created_at"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    automatic: Mapped[bool] = mapped_column(Boolean, default=True)
    ticket_id: Mapped[int | None] = mapped_column(
        ForeignKey("tickets.id", ondelete="SET NULL"), index=True
    )
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    mail_from: Mapped[str] = mapped_column(String(320))
    recipient: Mapped[str] = mapped_column(String(320))
    content: Mapped[bytes] = mapped_column(LargeBinary)
    header_message_id: Mapped[str] = mapped_column(String(998), default="", index=True)
    # queued -> sending -> sent | failed. A claim is a lease: a row whose lease ran
    # out (its instance died) goes back to queued; a live instance's rows do not.
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    state: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Staff got a copy of a report about this row: never a second one.
    reported_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # What was sent, as a hash for claims (set when the row is queued).
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    # Retention or erasure blanked recipient and content.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Suppression(Base):
    """An address whose mail bounced permanently: no automatic mail until it expires."""

    __tablename__ = "suppressions"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    until: Mapped[datetime] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    event: Mapped[str] = mapped_column(String(64))
    ticket_id: Mapped[int | None] = mapped_column(
        ForeignKey("tickets.id", ondelete="SET NULL"), index=True
    )
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    actor: Mapped[str] = mapped_column(String(64), default="daemon")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Retention took the personal details out of ``data`` (never looked at again).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ImapMailbox(Base):
    """IMAP mode: how far one watched folder has been taken.

    ``last_uid`` is committed in the same transaction as the messages up to it,
    so a restart neither skips nor takes again what was stored; a new
    UIDVALIDITY starts the folder over (the delivery index stops duplicates).
    """

    __tablename__ = "imap_mailboxes"

    mailbox: Mapped[str] = mapped_column(String(500), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    last_uid: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ImapFiling(Base):
    """A stored message still in the watched folder: filed once it has a decision."""

    __tablename__ = "imap_filing"

    mailbox: Mapped[str] = mapped_column(String(500), primary_key=True)
    uidvalidity: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    uid: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    message_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
