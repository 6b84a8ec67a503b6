"""The apply step: the plans of a batch executed in the transaction that records them.

A decision and the mail it causes commit together or not at all, a whole batch
in a few batched statements. Automatic mail passes one filter first
(suppression after a bounce, rate limits per recipient, per ticket, and for
strangers per domain and overall, no notice in answer to a notice); what the
filter stops is recorded on the message and named in its staff copy, so a
forger who used up an owner's quota cannot leave the owner's real request
silently linkless.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.apply import tickets
from iqmaild.apply.tickets import TicketRow, tag_for
from iqmaild.clock import Clock
from iqmaild.core.addresses import normalize, split_extension
from iqmaild.core.keys import KeyRing
from iqmaild.core.mail import MailIntent, StaffCopy
from iqmaild.core.plan import Plan
from iqmaild.core.policy import TicketAction
from iqmaild.core.ratelimit import Limits, Quota
from iqmaild.core.tag import TagFormat
from iqmaild.core.vocabulary import AUTOMATIC_MAIL, MailKind, TicketState
from iqmaild.deliver.compose import Composer, ThreadInfo, TicketRef, safe_token
from iqmaild.metrics import Metrics
from iqmaild.parse.message import ParsedMail
from iqmaild.storage.models import (
    Account,
    AuditEvent,
    AuthToken,
    Message,
    OutboxItem,
    Suppression,
)

ANSWERS = frozenset({MailKind.NOTICE, MailKind.REFUSAL})
CUSTOMER_KINDS = frozenset(k.value for k in AUTOMATIC_MAIL | {MailKind.STAFF_REPLY})


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class Settings:
    """The configuration the apply step reads, taken once at wiring."""

    number_start: int
    link_ttl_hours: int
    public_url: str
    default_lang: str
    staff_address: str
    return_path: str
    delimiter: str
    desk_addresses: frozenset[str]
    bounce_suppress_hours: float
    limits: Limits
    sequence_numbers: bool  # PostgreSQL: ticket numbers from a sequence


@dataclass
class Claimed:
    """A received message claimed for processing."""

    id: int
    raw: bytes
    mail_from: str
    rcpt_to: list[str]
    channel: str
    account_id: str | None
    headers: dict[str, Any]
    message_id: str
    attempts: int


@dataclass
class Returned:
    """The outbox row a report sent to our envelope sender is about."""

    id: int
    kind: str
    ticket_id: int | None
    recipient: str
    reported_at: datetime | None


@dataclass
class Planned:
    """One message of a batch: what it is, its plan, and the ticket it concerns."""

    message: Claimed
    parsed: ParsedMail
    plan: Plan
    ticket: TicketRow | None
    returned: Returned | None = None
    suppressed: list[str] = field(default_factory=list)


@dataclass
class Writes:
    """What a batch writes, gathered first and written in a few statements."""

    outbox: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (outbox index, row)
    audits: list[dict[str, Any]] = field(default_factory=list)


class Applier:
    def __init__(
        self,
        settings: Settings,
        composer: Composer,
        tags: TagFormat,
        key: KeyRing | bytes,
        clock: Clock,
        log: Any,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.composer = composer
        self.tags = tags
        self.key = key
        self.clock = clock
        self.log = log
        self.metrics = metrics

    # -- the batch ------------------------------------------------------------

    def advance(self, planned: Planned) -> None:
        """What the plan does to an existing ticket, at once (the next message of the
        batch sees it: a reopened ticket, a replaced code, an adopted account)."""
        op, row = planned.plan.ticket, planned.ticket
        if row is None or op.action is not TicketAction.ATTACH:
            return
        now = self.clock.now()
        if op.reopen:
            tickets.set_state(row, TicketState.OPEN, now)
        if op.adopt_account and row.account_id is None:
            row.account_id = planned.plan.verdict.account_id
        if op.rotate_code:
            row.code_nonce = secrets.token_bytes(16)
        row.updated_at = now
        row.dirty = True

    async def execute(self, session: AsyncSession, batch: list[Planned], instance: str) -> None:
        """Write every plan of the batch: tickets, messages, audits, reports, mail."""
        now = self.clock.now()
        langs = await self._langs(session, batch)
        new = [p for p in batch if p.plan.ticket.action is TicketAction.NEW]
        numbers = await tickets.allocate_numbers(
            session,
            len(new),
            self.settings.number_start,
            sequence=self.settings.sequence_numbers,
        )
        for planned, number in zip(new, numbers, strict=True):
            planned.ticket = self._new_ticket(planned, number, langs, now)
        await tickets.insert_new(session, [p.ticket for p in new if p.ticket])
        await tickets.update_changed(
            session, list({id(p.ticket): p.ticket for p in batch if p.ticket}.values())
        )
        writes = Writes()
        for planned in batch:
            for entry in planned.plan.audits:
                writes.audits.append(self._audit(entry.event, planned, now, **dict(entry.data)))
        await self._returned(session, batch, writes, now)
        await self._burn_copies(session, batch, writes, now)
        await self._mail(session, batch, writes, now)
        await self._update_messages(session, batch, now, instance)
        await self.write(session, writes)

    def _new_ticket(
        self, planned: Planned, number: int, langs: dict[str, str], now: datetime
    ) -> TicketRow:
        verdict = planned.plan.verdict
        return TicketRow(
            id=None,
            number=number,
            code_nonce=secrets.token_bytes(16),
            account_id=verdict.account_id,
            service_id=verdict.service_id,
            state=TicketState.OPEN.value,
            authorization=planned.plan.ticket.authorization,
            channel=planned.message.channel,
            requester=verdict.sender,
            subject=self.tags.strip(planned.parsed.subject)[:500],
            lang=langs.get(verdict.account_id or "", self.settings.default_lang),
            created_at=now,
            updated_at=now,
        )

    async def _langs(self, session: AsyncSession, batch: list[Planned]) -> dict[str, str]:
        accounts = {p.plan.verdict.account_id for p in batch if p.plan.verdict.account_id}
        if not accounts:
            return {}
        rows = await session.execute(
            select(Account.id, Account.lang).where(Account.id.in_(accounts))
        )
        return {account: lang for account, lang in rows}

    async def _update_messages(
        self, session: AsyncSession, batch: list[Planned], now: datetime, instance: str
    ) -> None:
        rows = []
        for p in batch:
            m = p.plan.message
            headers = dict(p.parsed.headers)
            rows.append(
                {
                    "b_id": p.message.id,
                    "b_claimed_by": instance,
                    "ticket_id": p.ticket.id if p.ticket else None,
                    "state": "processed",
                    "processed_at": now,
                    "decision": m.decision,
                    "reasons": list(m.reasons),
                    "rules_hit": list(m.rules_hit),
                    "sender_role": m.sender_role,
                    "account_id": m.account_id,
                    "from_address": m.from_address,
                    "outbox_ref": m.outbox_ref,
                    "subject": p.parsed.subject[:2000],
                    "headers": headers,
                    "defects": list(p.parsed.defects)[:50],
                    "suppressed": p.suppressed,
                    "claimed_by": None,
                    "claimed_until": None,
                }
            )
        names = [k for k in rows[0] if not k.startswith("b_")] if rows else []
        table = Message.__table__  # Core: one executemany, no ORM bookkeeping
        await session.execute(
            update(table)
            .where(table.c.id == bindparam("b_id"), table.c.claimed_by == bindparam("b_claimed_by"))
            .values({name: bindparam(name) for name in names}),
            rows,
        )

    async def _returned(
        self, session: AsyncSession, batch: list[Planned], writes: Writes, now: datetime
    ) -> None:
        """Reports about our own mail, filed under their outbox rows.

        Only a report sent to a row's signed envelope sender gets here, and only
        a delivery report saying the mail failed suppresses (that row's recipient,
        never anyone the report merely names) or burns the row's link. A delay
        warning, a vacation reply or a challenge is filed, nothing more; a staff
        copy that came back is an alert, never suppressed.
        """
        for p in batch:
            row = p.returned
            if row is None:
                continue
            report = p.parsed.report
            failed = report is not None and bool(report.failed)
            status = report.failed[0][1] if report is not None and report.failed else ""
            if not status:
                status = "delayed" if report is not None and report.delayed else "no failure"
            values: dict[str, Any] = {
                "last_error": f"returned: {status} (message {p.message.id})"[:2000]
            }
            if p.plan.staff_copy:
                values["reported_at"] = now
            await session.execute(update(OutboxItem).where(OutboxItem.id == row.id).values(values))
            writes.audits.append(
                self._audit("outbox.returned", p, now, outbox=row.id, kind=row.kind, status=status)
            )
            self.metrics.inc("outbox_returned_total", kind=row.kind)
            if not failed:
                continue
            if row.kind == MailKind.STAFF.value:
                self.log.error("outbox.staff_returned", outbox=row.id, status=status)
                continue
            self.log.warning("outbox.returned", outbox=row.id, kind=row.kind, status=status)
            if row.kind == MailKind.AUTH_REQUEST.value:
                await session.execute(
                    update(AuthToken)
                    .where(AuthToken.outbox_id == row.id, AuthToken.used_at.is_(None))
                    .values(used_at=now)
                )
            hours = self.settings.bounce_suppress_hours
            if hours and row.kind in CUSTOMER_KINDS:
                await suppress(session, row.recipient, status or "5.0.0", now, hours)
                writes.audits.append(
                    self._audit("suppression.added", p, now, email=row.recipient, status=status)
                )

    async def _burn_copies(
        self, session: AsyncSession, batch: list[Planned], writes: Writes, now: datetime
    ) -> None:
        """A link that came back in a message (a returned link mail, a quote) is spent:
        a copy of it now sits in our database and in the staff mailbox."""
        for p in batch:
            tokens = p.parsed.link_tokens
            if not tokens:
                continue
            result = await session.execute(
                update(AuthToken)
                .where(AuthToken.token_hash.in_([token_hash(t) for t in tokens]))
                .where(AuthToken.used_at.is_(None))
                .values(used_at=now)
            )
            burned = int(getattr(result, "rowcount", 0) or 0)
            if burned:
                writes.audits.append(
                    self._audit("authlink.burned", p, now, links=burned, why="returned_copy")
                )
                self.log.info("authlink.burned", message=p.message.id, links=burned)

    # -- mail -----------------------------------------------------------------

    async def _mail(
        self, session: AsyncSession, batch: list[Planned], writes: Writes, now: datetime
    ) -> None:
        automatic = [
            (p, i)
            for p in batch
            for i in p.plan.mails
            if i.kind in AUTOMATIC_MAIL and i.recipient is not None and p.ticket is not None
        ]
        quota = await self.quota(
            session,
            {i.recipient for _, i in automatic if i.recipient},
            {p.ticket.id for p, _ in automatic if p.ticket and p.ticket.id},
            strangers=any(i.kind is MailKind.REFUSAL for _, i in automatic),
        )
        for p in batch:
            ticket = p.ticket
            thread = ThreadInfo(p.parsed.message_id, p.parsed.references, p.parsed.thread_index)
            staff: StaffCopy | None = None
            for intent in p.plan.mails:
                if intent.kind is MailKind.STAFF:
                    assert isinstance(intent.context, StaffCopy)
                    staff = intent.context
                    continue
                if ticket is None or intent.recipient is None:
                    continue
                why = self._filter(p, intent, quota)
                if why is not None:
                    p.suppressed.append(f"{intent.kind.value}:{why}")
                    writes.audits.append(
                        self._audit(
                            "autoreply.suppressed",
                            p,
                            now,
                            kind=intent.kind.value,
                            recipient=intent.recipient,
                            why=why,
                        )
                    )
                    self.log.info(
                        "autoreply.suppressed",
                        ticket=ticket.number,
                        kind=intent.kind.value,
                        why=why,
                    )
                    self.metrics.inc("autoreplies_suppressed_total", why=why)
                    continue
                lang = ticket.lang if intent.reveals_ticket else self.settings.default_lang
                self.queue_customer(writes, intent, ticket, thread, p.message.id, lang, now)
            if staff is not None:
                writes.outbox.append(
                    self.staff_row(
                        raw=p.message.raw,
                        message_id=p.message.id,
                        rcpt_to=p.message.rcpt_to,
                        account_id=p.plan.message.account_id,
                        ticket=ticket,
                        context=staff,
                        suppressed=p.suppressed,
                        returned=p.returned,
                        now=now,
                    )
                )

    def _filter(self, p: Planned, intent: MailIntent, quota: Quota) -> str | None:
        """The one filter automatic mail passes; None lets it through (and counts it)."""
        assert intent.recipient is not None and p.ticket is not None
        if intent.kind in ANSWERS and p.parsed.facts.answers_notice:
            # A reply to a notice of ours (an auto-responder without Auto-Submitted,
            # most likely): answering it too would ping-pong until the rate limit.
            return "answers_a_notice"
        stranger = intent.kind is MailKind.REFUSAL and p.plan.message.sender_role == "unknown"
        why = quota.check(intent.recipient, p.ticket.id, refusal_to_stranger=stranger)
        if why is None:
            quota.record(
                intent.recipient,
                p.ticket.id,
                refusal=intent.kind is MailKind.REFUSAL,
                stranger=stranger,
            )
        return why

    async def quota(
        self,
        session: AsyncSession,
        recipients: set[str],
        ticket_ids: set[int],
        *,
        strangers: bool = False,
    ) -> Quota:
        """What the outbox holds for these recipients and tickets: the filter's memory."""
        now = self.clock.now()
        sent_to: dict[str, list[datetime]] = {}
        per_ticket: dict[int, int] = {}
        suppressed: dict[str, datetime] = {}
        refusals: list[tuple[str, bool]] = []
        day_ago = now - timedelta(days=1)
        if recipients:
            rows = await session.execute(
                select(OutboxItem.recipient, OutboxItem.created_at).where(
                    OutboxItem.recipient.in_(recipients),
                    OutboxItem.automatic.is_(True),
                    OutboxItem.created_at > day_ago,
                )
            )
            for recipient, created in rows:
                sent_to.setdefault(recipient, []).append(created)
            rows = await session.execute(
                select(Suppression.email, Suppression.until).where(
                    Suppression.email.in_(recipients)
                )
            )
            suppressed = {email: until for email, until in rows}
        if ticket_ids:
            rows = await session.execute(
                select(OutboxItem.ticket_id, OutboxItem.id).where(
                    OutboxItem.ticket_id.in_(ticket_ids),
                    OutboxItem.automatic.is_(True),
                    OutboxItem.created_at > day_ago,
                )
            )
            for ticket_id, _ in rows:
                per_ticket[ticket_id] = per_ticket.get(ticket_id, 0) + 1
        if strangers:
            # Refusals of the last hour: few, since they are capped.
            rows = await session.execute(
                select(OutboxItem.recipient, Message.sender_role)
                .outerjoin(Message, Message.id == OutboxItem.message_id)
                .where(
                    OutboxItem.kind == MailKind.REFUSAL.value,
                    OutboxItem.created_at > now - timedelta(hours=1),
                )
            )
            refusals = [(recipient, role == "unknown") for recipient, role in rows]
        return Quota(now, self.settings.limits, sent_to, per_ticket, suppressed, refusals)

    # -- rows, shared with the link page and the CLI -----------------------------

    def outbox_row(
        self,
        kind: MailKind,
        recipient: str,
        content: bytes,
        header_message_id: str,
        ticket_id: int | None,
        message_id: int | None,
        now: datetime,
    ) -> dict[str, Any]:
        return {
            "kind": kind.value,
            "automatic": kind in AUTOMATIC_MAIL,
            "ticket_id": ticket_id,
            "message_id": message_id,
            "mail_from": self.settings.return_path,
            "recipient": recipient,
            "content": content,
            "header_message_id": header_message_id,
            "state": "queued",
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            # What was sent, for claims: the content itself is blanked once the
            # relay took it, and the rest of the row when retention purges it.
            "content_sha256": hashlib.sha256(content).hexdigest(),
        }

    def queue_customer(
        self,
        writes: Writes,
        intent: MailIntent,
        ticket: Any,
        thread: ThreadInfo | None,
        message_id: int | None,
        lang: str,
        now: datetime,
    ) -> None:
        """Compose one mail of ``intent`` (a link mail with its fresh token) into ``writes``."""
        assert intent.recipient is not None
        extra: dict[str, Any] = {}
        if intent.kind is MailKind.AUTH_REQUEST:
            token = secrets.token_urlsafe(32)
            hours = self.settings.link_ttl_hours
            extra = {
                "link": f"{self.settings.public_url}/authorize/{token}",
                "expires_hours": hours,
            }
            token_row = {
                "token_hash": token_hash(token),
                "ticket_id": ticket.id,
                "message_id": message_id,
                "email": intent.recipient,
                "created_at": now,
                "expires_at": now + timedelta(hours=hours),
            }
            writes.tokens.append((len(writes.outbox), token_row))
        ref = None
        if intent.reveals_ticket:
            ref = TicketRef(
                ticket.number,
                tag_for(self.tags, self.key, ticket, intent.include_code),
                ticket.subject,
            )
        composed = self.composer.customer_mail(
            kind=intent.kind,
            lang=lang,
            ticket=ref,
            recipient=intent.recipient,
            thread=thread,
            automatic=intent.kind in AUTOMATIC_MAIL,
            **intent.template_vars(),
            **extra,
        )
        writes.outbox.append(
            self.outbox_row(
                intent.kind,
                intent.recipient,
                composed.content,
                composed.message_id,
                # A refusal names no ticket, in its row too: a report to its return
                # address must not file anything under the ticket a stranger guessed.
                ticket.id if intent.reveals_ticket else None,
                message_id,
                now,
            )
        )

    def staff_row(
        self,
        *,
        raw: bytes,
        message_id: int,
        rcpt_to: list[str],
        account_id: str | None,
        ticket: Any,
        context: StaffCopy,
        now: datetime,
        suppressed: list[str] | None = None,
        returned: Returned | None = None,
    ) -> dict[str, Any]:
        headers = {
            "X-IQ-Ticket": str(ticket.number) if ticket else "none",
            "X-IQ-Authorization": context.decision,
            "X-IQ-Reasons": ",".join(context.reasons) or "none",
            "X-IQ-Account": safe_token(account_id or "") or "none",
            "X-IQ-Sender-Role": context.sender_role or "none",
            "X-IQ-Message": str(message_id),
        }
        if suppressed:
            headers["X-IQ-Suppressed"] = ",".join(suppressed)
        if returned is not None:
            headers["X-IQ-Returned"] = f"outbox {returned.id} {returned.kind}"
        extensions = self.desk_extensions(rcpt_to)
        if extensions:
            headers["X-IQ-Desk-Extension"] = ",".join(safe_token(e) for e in extensions)
        composed = self.composer.staff_delivery(raw, headers, ticket.number if ticket else None)
        return self.outbox_row(
            MailKind.STAFF,
            self.settings.staff_address,
            composed.content,
            composed.message_id,
            ticket.id if ticket else None,
            message_id,
            now,
        )

    def desk_extensions(self, rcpt_to: Iterable[str]) -> list[str]:
        """The sub-address extensions (bok+faktury@ -> faktury) the mail was sent to."""
        out = []
        for address in rcpt_to:
            norm = normalize(address)
            if norm is None:
                continue
            base, extension = split_extension(norm, self.settings.delimiter)
            if extension and base in self.settings.desk_addresses:
                out.append(extension)
        return out

    def _audit(self, event: str, p: Planned | None, now: datetime, **data: Any) -> dict[str, Any]:
        return audit_row(
            event,
            now,
            ticket_id=p.ticket.id if p and p.ticket else None,
            message_id=p.message.id if p else None,
            **data,
        )

    async def write(self, session: AsyncSession, writes: Writes) -> None:
        """The batch's new rows: outbox (ids back, in order), the links' tokens, audits."""
        for audit in writes.audits:  # tickets got their ids only now, for new ones
            audit.setdefault("actor", "daemon")
        if writes.outbox:
            result = await session.execute(
                insert(OutboxItem).returning(OutboxItem.id, sort_by_parameter_order=True),
                writes.outbox,
            )
            ids = [row_id for (row_id,) in result]
            tokens = [{**row, "outbox_id": ids[index]} for index, row in writes.tokens]
            if tokens:
                await session.execute(insert(AuthToken), tokens)
        if writes.audits:
            await session.execute(insert(AuditEvent), writes.audits)


def audit_row(
    event: str,
    now: datetime,
    *,
    ticket_id: int | None = None,
    message_id: int | None = None,
    actor: str = "daemon",
    **data: Any,
) -> dict[str, Any]:
    return {
        "event": event,
        "ts": now,
        "ticket_id": ticket_id,
        "message_id": message_id,
        "actor": actor,
        "data": data,
    }


async def suppress(
    session: AsyncSession, address: str, reason: str, now: datetime, hours: float
) -> None:
    """No automatic mail to ``address`` for ``hours`` (its mail bounced for good)."""
    until = now + timedelta(hours=hours)
    existing = await session.get(Suppression, address)
    if existing is None:
        session.add(Suppression(email=address, reason=reason[:500], until=until))
    else:
        existing.until, existing.reason = until, reason[:500]
