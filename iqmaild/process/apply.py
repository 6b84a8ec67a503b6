"""Effects of decisions as rows: outbox mail, authorization tokens, audit events.

Everything here runs inside the transaction that records the decision, so a
decision and the mail it causes commit together or not at all. Automatic mail
is rate-limited per recipient and per ticket, and never goes to an address
whose mail recently bounced.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.core.ratelimit import Window, allows, longest
from iqmaild.outbound.compose import Composed, ThreadInfo, TicketRef, safe_token
from iqmaild.process.desk import Desk
from iqmaild.process.tickets import tag_for
from iqmaild.storage.models import AuditEvent, AuthToken, Message, OutboxItem, Suppression, Ticket
from iqmaild.storage.models import utcnow as now


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def audit(
    session: AsyncSession,
    event: str,
    *,
    ticket: Ticket | None = None,
    message: Message | None = None,
    actor: str = "daemon",
    **data: Any,
) -> None:
    session.add(
        AuditEvent(
            event=event,
            ticket_id=ticket.id if ticket else None,
            message_id=message.id if message else None,
            actor=actor,
            data=data,
        )
    )


def enqueue(
    session: AsyncSession,
    desk: Desk,
    *,
    kind: str,
    recipient: str,
    content: bytes,
    header_message_id: str = "",
    ticket: Ticket | None = None,
    message: Message | None = None,
    automatic: bool,
) -> OutboxItem:
    item = OutboxItem(
        kind=kind,
        automatic=automatic,
        ticket_id=ticket.id if ticket else None,
        message_id=message.id if message else None,
        mail_from=desk.composer.envelope_from,
        recipient=recipient,
        content=content,
        header_message_id=header_message_id,
        next_attempt_at=now(),
    )
    session.add(item)
    return item


async def automatic_blocked(
    session: AsyncSession,
    desk: Desk,
    recipient: str,
    ticket: Ticket | None,
    unknown_sender: bool = False,
) -> str | None:
    """Why automatic mail to this recipient must not go now, or None."""
    current = now()
    suppressed = await session.get(Suppression, recipient)
    if suppressed is not None and suppressed.until > current:
        return "bounced"
    limits = desk.config.outbound.rate_limit
    if unknown_sender:
        # Forged spam makes notices to strangers backscatter; victim+1@, victim+2@...
        # each have their own per-recipient window, so cap the whole domain too.
        domain = recipient.rpartition("@")[2]
        count = await session.scalar(
            select(func.count(OutboxItem.id)).where(
                OutboxItem.created_at > current - timedelta(hours=1),
                OutboxItem.kind == "unauthorized",
                OutboxItem.recipient.endswith(f"@{domain}", autoescape=True),
            )
        )
        if (count or 0) >= limits.unknown_sender_domain_hour:
            return "unknown_sender_domain_rate_limit"
    windows = (Window(600, limits.per_recipient_10min), Window(86400, limits.per_recipient_day))
    since = current - longest(windows)
    sent = await session.scalars(
        select(OutboxItem.created_at).where(
            OutboxItem.recipient == recipient,
            OutboxItem.automatic.is_(True),
            OutboxItem.created_at > since,
        )
    )
    if not allows(list(sent), current, windows):
        return "recipient_rate_limit"
    if ticket is not None and ticket.id is not None:
        count = await session.scalar(
            select(func.count(OutboxItem.id)).where(
                OutboxItem.ticket_id == ticket.id,
                OutboxItem.automatic.is_(True),
                OutboxItem.created_at > current - timedelta(days=1),
            )
        )
        if (count or 0) >= limits.per_ticket_day:
            return "ticket_rate_limit"
    return None


async def _may_send(
    session: AsyncSession,
    desk: Desk,
    kind: str,
    recipient: str,
    ticket: Ticket,
    message: Message | None,
    unknown_sender: bool = False,
) -> bool:
    """Check the limits for one automatic mail; a refusal is audited and logged."""
    blocked = await automatic_blocked(session, desk, recipient, ticket, unknown_sender)
    if blocked is None:
        return True
    audit(
        session,
        "autoreply.suppressed",
        ticket=ticket,
        message=message,
        kind=kind,
        recipient=recipient,
        why=blocked,
    )
    desk.log.info("autoreply.suppressed", ticket=ticket.number, kind=kind, why=blocked)
    desk.metrics.inc("autoreplies_suppressed_total", why=blocked)
    return False


async def customer_mail(
    session: AsyncSession,
    desk: Desk,
    *,
    kind: str,
    ticket: Ticket,
    recipient: str,
    include_code: bool,
    thread: ThreadInfo | None,
    message: Message | None = None,
    automatic: bool = True,
    check_limits: bool = True,
    unknown_sender: bool = False,
    **ctx: Any,
) -> bool:
    """Queue one templated mail to a customer; False when limits stopped it."""
    if (
        automatic
        and check_limits
        and not await _may_send(session, desk, kind, recipient, ticket, message, unknown_sender)
    ):
        return False
    ref = TicketRef(
        ticket.number, tag_for(desk.tags, desk.key, ticket, include_code), ticket.subject
    )
    composed: Composed = desk.composer.customer_mail(
        template=kind,
        lang=ticket.lang,
        ticket=ref,
        recipient=recipient,
        thread=thread,
        automatic=automatic,
        **ctx,
    )
    enqueue(
        session,
        desk,
        kind=kind,
        recipient=recipient,
        content=composed.content,
        header_message_id=composed.message_id,
        ticket=ticket,
        message=message,
        automatic=automatic,
    )
    return True


async def issue_link(
    session: AsyncSession,
    desk: Desk,
    *,
    ticket: Ticket,
    recipient: str,
    thread: ThreadInfo | None,
    message: Message | None,
) -> bool:
    """Create a single-use token (only its hash is kept) and mail the link."""
    if not await _may_send(session, desk, "auth_request", recipient, ticket, message):
        return False
    token = secrets.token_urlsafe(32)
    hours = desk.config.tickets.link_ttl_hours
    session.add(
        AuthToken(
            token_hash=token_hash(token),
            ticket_id=ticket.id,
            message_id=message.id if message else None,
            email=recipient,
            expires_at=now() + timedelta(hours=hours),
        )
    )
    link = f"{desk.config.http.public_url}/authorize/{token}"
    await customer_mail(
        session,
        desk,
        kind="auth_request",
        ticket=ticket,
        recipient=recipient,
        include_code=True,
        thread=thread,
        message=message,
        check_limits=False,
        link=link,
        expires_hours=hours,
    )
    return True


def staff_delivery(
    session: AsyncSession,
    desk: Desk,
    *,
    message: Message,
    ticket: Ticket | None,
    decision: str,
    reasons: list[str],
    sender_role: str | None,
) -> None:
    headers = {
        "X-IQ-Ticket": str(ticket.number) if ticket else "none",
        "X-IQ-Authorization": decision,
        "X-IQ-Reasons": ",".join(reasons) or "none",
        "X-IQ-Account": safe_token(message.account_id or "") or "none",
        "X-IQ-Sender-Role": sender_role or "none",
        "X-IQ-Message": str(message.id),
    }
    content = desk.composer.staff_delivery(message.raw, headers)
    enqueue(
        session,
        desk,
        kind="staff",
        recipient=desk.config.outbound.staff_address,
        content=content,
        ticket=ticket,
        message=message,
        automatic=False,
    )


async def authorize_ticket(session: AsyncSession, desk: Desk, ticket: Ticket) -> int:
    """The ticket becomes authorized, by a link click or by a follow-up with the code.

    Its pending messages reach staff again, now as authorized, and its other
    links are spent. Returns how many messages were pending.
    """
    current = now()
    ticket.authorization = "authorized"
    ticket.updated_at = current
    pending = list(
        await session.scalars(
            select(Message).where(Message.ticket_id == ticket.id, Message.decision == "pending")
        )
    )
    for message in pending:
        message.decision = "authorized"
        staff_delivery(
            session,
            desk,
            message=message,
            ticket=ticket,
            decision="authorized",
            reasons=[],
            sender_role=message.sender_role,
        )
    await session.execute(
        update(AuthToken)
        .where(AuthToken.ticket_id == ticket.id, AuthToken.used_at.is_(None))
        .values(used_at=current)
    )
    return len(pending)
