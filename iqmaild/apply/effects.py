"""The apply step: a message's plan executed inside the transaction that records it.

A decision and the mail it causes commit together or not at all. Automatic mail
passes one filter first (suppression after a bounce, rate limits per recipient,
per ticket, and for strangers per domain and overall); what the filter stops is
recorded on the message and named in its staff copy, so a forger who used up an
owner's quota cannot leave the owner's real request silently linkless.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.apply import tickets
from iqmaild.apply.desk import Desk
from iqmaild.apply.tickets import tag_for
from iqmaild.core.mail import MailIntent, StaffCopy
from iqmaild.core.plan import Plan
from iqmaild.core.policy import TicketAction
from iqmaild.core.ratelimit import Window, allows, longest
from iqmaild.core.vocabulary import AUTOMATIC_MAIL, MailKind, TicketState
from iqmaild.deliver.compose import ThreadInfo, TicketRef, safe_token
from iqmaild.parse.message import ParsedMail
from iqmaild.storage.models import (
    Account,
    AuditEvent,
    AuthToken,
    Message,
    OutboxItem,
    Suppression,
    Ticket,
)
from iqmaild.storage.models import utcnow as now

ANSWERS = frozenset({MailKind.NOTICE, MailKind.REFUSAL})


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
    kind: MailKind,
    recipient: str,
    content: bytes,
    header_message_id: str = "",
    ticket: Ticket | None = None,
    message: Message | None = None,
) -> OutboxItem:
    item = OutboxItem(
        kind=kind.value,
        automatic=kind in AUTOMATIC_MAIL,
        ticket_id=ticket.id if ticket else None,
        message_id=message.id if message else None,
        mail_from=desk.config.return_path_base,
        recipient=recipient,
        content=content,
        header_message_id=header_message_id,
        next_attempt_at=now(),
    )
    session.add(item)
    return item


async def blocked(
    session: AsyncSession,
    desk: Desk,
    kind: MailKind,
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
    hour_ago = current - timedelta(hours=1)
    if unknown_sender:
        # Forged spam makes notices to strangers backscatter: victim+1@, victim+2@...
        # each have their own per-recipient window, so cap the domain and the whole.
        domain = recipient.rpartition("@")[2]
        count = await session.scalar(
            select(func.count(OutboxItem.id)).where(
                OutboxItem.created_at > hour_ago,
                OutboxItem.kind == MailKind.REFUSAL.value,
                OutboxItem.recipient.endswith(f"@{domain}", autoescape=True),
            )
        )
        if (count or 0) >= limits.unknown_sender_domain_hour:
            return "unknown_sender_domain_rate_limit"
        count = await session.scalar(
            select(func.count(OutboxItem.id))
            .join(Message, Message.id == OutboxItem.message_id)
            .where(
                OutboxItem.created_at > hour_ago,
                OutboxItem.kind == MailKind.REFUSAL.value,
                Message.sender_role == "unknown",
            )
        )
        if (count or 0) >= limits.unknown_sender_hour:
            return "unknown_sender_rate_limit"
    windows = (Window(600, limits.per_recipient_10min), Window(86400, limits.per_recipient_day))
    sent = await session.scalars(
        select(OutboxItem.created_at).where(
            OutboxItem.recipient == recipient,
            OutboxItem.automatic.is_(True),
            OutboxItem.created_at > current - longest(windows),
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


async def _filter(
    session: AsyncSession,
    desk: Desk,
    intent: MailIntent,
    ticket: Ticket,
    message: Message | None,
    unknown_sender: bool = False,
) -> str | None:
    """The one filter automatic mail passes; a stop is audited, logged and counted."""
    assert intent.recipient is not None
    why = await blocked(session, desk, intent.kind, intent.recipient, ticket, unknown_sender)
    if why is None:
        return None
    audit(
        session,
        "autoreply.suppressed",
        ticket=ticket,
        message=message,
        kind=intent.kind.value,
        recipient=intent.recipient,
        why=why,
    )
    desk.log.info("autoreply.suppressed", ticket=ticket.number, kind=intent.kind.value, why=why)
    desk.metrics.inc("autoreplies_suppressed_total", why=why)
    return why


async def customer_mail(
    session: AsyncSession,
    desk: Desk,
    intent: MailIntent,
    *,
    ticket: Ticket,
    thread: ThreadInfo | None,
    message: Message | None = None,
    lang: str | None = None,
    unknown_sender: bool = False,
    check_limits: bool = True,
    **extra: Any,
) -> OutboxItem | str:
    """Queue one mail of ``intent`` to a customer: the outbox row, or why it was stopped."""
    assert intent.recipient is not None
    if intent.kind in AUTOMATIC_MAIL and check_limits:
        why = await _filter(session, desk, intent, ticket, message, unknown_sender)
        if why is not None:
            return why
    ref = None
    if intent.reveals_ticket:
        tag = tag_for(desk.tags, desk.key, ticket, intent.include_code)
        ref = TicketRef(ticket.number, tag, ticket.subject)
    composed = desk.composer.customer_mail(
        kind=intent.kind,
        lang=lang or ticket.lang,
        ticket=ref,
        recipient=intent.recipient,
        thread=thread,
        automatic=intent.kind in AUTOMATIC_MAIL,
        **intent.template_vars(),
        **extra,
    )
    return enqueue(
        session,
        desk,
        kind=intent.kind,
        recipient=intent.recipient,
        content=composed.content,
        header_message_id=composed.message_id,
        # A refusal names no ticket, in its row too: a report to its return address
        # must not file anything under the ticket a stranger guessed.
        ticket=ticket if intent.reveals_ticket else None,
        message=message,
    )


async def issue_link(
    session: AsyncSession,
    desk: Desk,
    intent: MailIntent,
    *,
    ticket: Ticket,
    thread: ThreadInfo | None,
    message: Message | None,
    check_limits: bool = True,
) -> OutboxItem | str:
    """A single-use token (only its hash is kept) and the mail with its link."""
    assert intent.recipient is not None
    if check_limits:
        why = await _filter(session, desk, intent, ticket, message)
        if why is not None:
            return why
    token = secrets.token_urlsafe(32)
    hours = desk.config.tickets.link_ttl_hours
    row = AuthToken(
        token_hash=token_hash(token),
        ticket_id=ticket.id,
        message_id=message.id if message else None,
        email=intent.recipient,
        expires_at=now() + timedelta(hours=hours),
    )
    session.add(row)
    item = await customer_mail(
        session,
        desk,
        intent,
        ticket=ticket,
        thread=thread,
        message=message,
        check_limits=False,
        link=f"{desk.config.http.public_url}/authorize/{token}",
        expires_hours=hours,
    )
    assert isinstance(item, OutboxItem)
    await session.flush()
    row.outbox_id = item.id
    return item


def staff_copy(
    session: AsyncSession,
    desk: Desk,
    *,
    message: Message,
    raw: bytes,
    ticket: Ticket | None,
    context: StaffCopy,
    suppressed: list[str] | None = None,
    returned: OutboxItem | None = None,
) -> OutboxItem:
    headers = {
        "X-IQ-Ticket": str(ticket.number) if ticket else "none",
        "X-IQ-Authorization": context.decision,
        "X-IQ-Reasons": ",".join(context.reasons) or "none",
        "X-IQ-Account": safe_token(message.account_id or "") or "none",
        "X-IQ-Sender-Role": context.sender_role or "none",
        "X-IQ-Message": str(message.id),
    }
    if suppressed:
        headers["X-IQ-Suppressed"] = ",".join(suppressed)
    if returned is not None:
        headers["X-IQ-Returned"] = f"outbox {returned.id} {returned.kind}"
    extensions = desk.desk_extensions(message.rcpt_to or [])
    if extensions:
        headers["X-IQ-Desk-Extension"] = ",".join(safe_token(e) for e in extensions)
    return enqueue(
        session,
        desk,
        kind=MailKind.STAFF,
        recipient=desk.config.outbound.staff_address,
        content=desk.composer.staff_delivery(raw, headers),
        ticket=ticket,
        message=message,
    )


async def authorize_ticket(session: AsyncSession, desk: Desk, ticket: Ticket) -> int:
    """The ticket becomes authorized (the link was clicked).

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
        context = StaffCopy("authorized", (), message.sender_role)
        staff_copy(session, desk, message=message, raw=message.raw, ticket=ticket, context=context)
    await session.execute(
        update(AuthToken)
        .where(AuthToken.ticket_id == ticket.id, AuthToken.used_at.is_(None))
        .values(used_at=current)
    )
    return len(pending)


async def burn_links(
    session: AsyncSession, desk: Desk, tokens: tuple[str, ...], message: Message, why: str
) -> int:
    """A link that came back in a message (a returned link mail) can no longer authorize."""
    if not tokens:
        return 0
    result = await session.execute(
        update(AuthToken)
        .where(AuthToken.token_hash.in_([token_hash(t) for t in tokens]))
        .where(AuthToken.used_at.is_(None))
        .values(used_at=now())
    )
    burned = int(getattr(result, "rowcount", 0) or 0)
    if burned:
        audit(session, "authlink.burned", message=message, links=burned, why=why)
        desk.log.info("authlink.burned", message=message.id, links=burned, why=why)
    return burned


async def file_returned(
    session: AsyncSession,
    desk: Desk,
    row: OutboxItem,
    parsed: ParsedMail,
    message: Message,
    *,
    copied: bool,
) -> None:
    """A report about our own mail, filed under its outbox row.

    Only a report sent to a row's signed envelope sender gets here, so only it
    can suppress: a permanent failure pauses automatic mail to that row's
    recipient (never to anyone the report merely names). A delay warning only
    records itself. A staff copy that came back is an alert, never suppressed.
    """
    report = parsed.report
    failed = report is not None and bool(report.failed)
    status = report.failed[0][1] if report is not None and report.failed else ""
    if not status:
        status = "delayed" if report is not None and report.delayed else "not a failure report"
    if copied:
        row.reported_at = now()
    row.last_error = f"returned: {status} (message {message.id})"[:2000]
    audit(session, "outbox.returned", message=message, outbox=row.id, kind=row.kind, status=status)
    desk.metrics.inc("outbox_returned_total", kind=row.kind)
    if not failed:
        # A delay warning, a vacation reply or a challenge sent to our return address:
        # filed, but only a delivery report saying it failed suppresses or burns.
        return
    if row.kind == MailKind.STAFF.value:
        desk.log.error("outbox.staff_returned", outbox=row.id, status=status)
        return
    desk.log.warning("outbox.returned", outbox=row.id, kind=row.kind, status=status)
    if row.kind == MailKind.AUTH_REQUEST.value:
        await session.execute(
            update(AuthToken)
            .where(AuthToken.outbox_id == row.id, AuthToken.used_at.is_(None))
            .values(used_at=now())
        )
    hours = desk.config.outbound.bounce_suppress_hours
    if hours and row.kind in {k.value for k in AUTOMATIC_MAIL | {MailKind.STAFF_REPLY}}:
        await suppress(session, row.recipient, status or "5.0.0", hours, message=message)


async def suppress(
    session: AsyncSession, address: str, reason: str, hours: float, message: Message | None = None
) -> None:
    until = now() + timedelta(hours=hours)
    existing = await session.get(Suppression, address)
    if existing is None:
        session.add(Suppression(email=address, reason=reason[:500], until=until))
    else:
        existing.until, existing.reason = until, reason[:500]
    audit(session, "suppression.added", message=message, email=address, status=reason[:200])


async def apply_plan(
    session: AsyncSession,
    desk: Desk,
    plan: Plan,
    *,
    message: Message,
    raw: bytes,
    parsed: ParsedMail,
    ticket: Ticket | None,
    returned: OutboxItem | None = None,
) -> Ticket | None:
    """Execute one plan: the ticket, the message row, audits, returned mail, mail."""
    verdict, op = plan.verdict, plan.ticket
    lang = desk.config.notices.default_lang
    if verdict.account_id:
        account = await session.get(Account, verdict.account_id)
        lang = account.lang if account else lang
    if op.action is TicketAction.NEW:
        ticket = await tickets.create_ticket(
            session,
            number_start=desk.config.tickets.number_start,
            authorization=op.authorization,
            channel=message.channel,
            requester=verdict.sender,
            subject=desk.tags.strip(parsed.subject)[:500],
            account_id=verdict.account_id,
            service_id=verdict.service_id,
            lang=lang,
        )
    elif op.action is TicketAction.NONE:
        ticket = None
    if ticket is not None and op.action is TicketAction.ATTACH:
        if op.reopen:
            tickets.set_state(ticket, TicketState.OPEN)
        if op.adopt_account and ticket.account_id is None:
            ticket.account_id = verdict.account_id
        ticket.updated_at = now()
    if ticket is not None and op.rotate_code:
        ticket.code_nonce = secrets.token_bytes(16)

    update_ = plan.message
    message.ticket_id = ticket.id if ticket else None
    message.state = "processed"
    message.processed_at = now()
    message.decision = update_.decision
    message.reasons = list(update_.reasons)
    message.rules_hit = list(update_.rules_hit)
    message.sender_role = update_.sender_role
    message.account_id = update_.account_id
    message.from_address = update_.from_address
    message.outbox_ref = update_.outbox_ref
    message.subject = parsed.subject[:2000]
    message.headers = parsed.headers
    message.defects = list(parsed.defects)[:50]
    for entry in plan.audits:
        audit(session, entry.event, ticket=ticket, message=message, **dict(entry.data))

    if returned is not None:
        await file_returned(session, desk, returned, parsed, message, copied=plan.staff_copy)
    await burn_links(session, desk, parsed.link_tokens, message, why="returned_copy")

    thread = ThreadInfo(parsed.message_id, parsed.references, parsed.thread_index)
    suppressed: list[str] = []
    staff: StaffCopy | None = None
    unknown = update_.sender_role == "unknown"
    for intent in plan.mails:
        if intent.kind is MailKind.STAFF:
            assert isinstance(intent.context, StaffCopy)
            staff = intent.context
            continue
        if ticket is None or intent.recipient is None:
            continue
        if intent.kind in ANSWERS and parsed.facts.answers_notice:
            # A reply to a notice of ours (an auto-responder without Auto-Submitted,
            # most likely): answering it too would ping-pong until the rate limit.
            suppressed.append(f"{intent.kind.value}:answers_a_notice")
            continue
        if intent.kind is MailKind.AUTH_REQUEST:
            outcome = await issue_link(
                session, desk, intent, ticket=ticket, thread=thread, message=message
            )
        else:
            outcome = await customer_mail(
                session,
                desk,
                intent,
                ticket=ticket,
                thread=thread,
                message=message,
                lang=None if intent.reveals_ticket else desk.config.notices.default_lang,
                unknown_sender=unknown and intent.kind is MailKind.REFUSAL,
            )
        if isinstance(outcome, str):
            suppressed.append(f"{intent.kind.value}:{outcome}")
    message.suppressed = suppressed
    if staff is not None:
        staff_copy(
            session,
            desk,
            message=message,
            raw=raw,
            ticket=ticket,
            context=staff,
            suppressed=suppressed,
            returned=returned,
        )
    return ticket
