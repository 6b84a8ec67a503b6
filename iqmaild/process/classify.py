"""The classify stage: stored message -> parsed facts -> verdict -> effects.

Runs outside the SMTP transaction on messages already committed, so a crash
between the two loses nothing: unprocessed rows are picked up on start. A
message that fails again and again is parked as a dead letter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta

from sqlalchemy import or_, select

from iqmaild.core.policy import ActionKind, TicketAction, Verdict, classify
from iqmaild.core.vocabulary import Channel, Decision, Reason, Role, TicketState
from iqmaild.ingest.parse import ParsedMail, parse_message, unparsable
from iqmaild.outbound.compose import ThreadInfo
from iqmaild.process import act, tickets
from iqmaild.process.bounces import suppress_bounced
from iqmaild.process.desk import Desk
from iqmaild.storage.db import Database
from iqmaild.storage.directory import view_for
from iqmaild.storage.models import Account, Message, Ticket, utcnow

TICKET_AUTHORIZATION = {
    Decision.AUTHORIZED: "authorized",
    Decision.PENDING: "pending",
    Decision.UNAUTHORIZED: "unauthorized",
    Decision.IGNORED: "unauthorized",
}


@dataclass(frozen=True)
class Outcome:
    message_id: int
    ticket: int | None
    verdict: Verdict


class Classifier:
    def __init__(
        self, db: Database, desk: Desk, on_processed: Callable[[], None] | None = None
    ) -> None:
        self.db = db
        self.desk = desk
        self.wakeup = asyncio.Event()
        self.on_processed = on_processed  # wakes the outbox after every commit

    def notify(self) -> None:
        self.wakeup.set()

    async def drain(self) -> int:
        """Process every message that is due; returns how many were handled."""
        handled = 0
        while True:
            async with self.db.read() as session:
                ids = list(
                    await session.scalars(
                        select(Message.id)
                        .where(
                            Message.state == "received",
                            or_(
                                Message.next_attempt_at.is_(None),
                                Message.next_attempt_at <= utcnow(),
                            ),
                        )
                        .order_by(Message.id)
                        .limit(100)
                    )
                )
            if not ids:
                return handled
            for message_id in ids:
                await self.process(message_id)
                handled += 1

    async def process(self, message_id: int) -> Outcome | None:
        try:
            outcome = await self._process(message_id)
        except Exception as exc:  # one poison message must not block the rest
            await self._failed(message_id, exc)
            return None
        if outcome is not None:
            v = outcome.verdict
            self.desk.log.info(
                "message.classified",
                message=message_id,
                ticket=outcome.ticket,
                decision=v.decision.value,
                reasons=[r.value for r in v.reasons],
                sender_role=v.sender_role.value if v.sender_role else None,
                rules=list(v.rules_hit),
                account=v.account_id,
            )
            self.desk.metrics.inc("messages_classified_total", decision=v.decision.value)
            if self.on_processed is not None:
                self.on_processed()
        return outcome

    async def _process(self, message_id: int) -> Outcome | None:
        async with self.db.read() as session:
            row = await session.get(Message, message_id)
            if row is None or row.state != "received":
                return None
            raw, mail_from, channel = row.raw, row.mail_from, Channel(row.channel)
            panel_account, panel_service = row.account_id, (row.headers or {}).get("panel_service")
        options = dict(
            mail_from=mail_from,
            tags=self.desk.tags,
            key=self.desk.key,
            msgid_domain=self.desk.composer.domain,
            trusted_authserv_ids=self.desk.trusted_authserv_ids,
            channel=channel,
        )
        try:
            # In a thread: a pathological message must not stall SMTP and HTTP.
            parsed = await asyncio.to_thread(parse_message, raw, **options)
        except Exception as exc:  # e.g. RecursionError on absurd MIME nesting
            self.desk.log.warning(
                "message.unparsable", message=message_id, error=type(exc).__name__
            )
            parsed = unparsable(raw, channel=channel, error=exc)
        if channel is Channel.PANEL:
            facts = replace(
                parsed.facts, panel_account_id=panel_account, panel_service_id=panel_service or None
            )
            parsed = replace(parsed, facts=facts)
        async with self.db.transaction(priority="background") as session:
            message = await session.get(Message, message_id, with_for_update=True)
            if message is None or message.state != "received":
                return None
            facts = parsed.facts
            number = facts.tag.number if facts.tag else facts.thread_ticket
            ticket = await tickets.by_number(session, number) if number else None
            emails = [*facts.from_addresses, *facts.recipients]
            directory = await view_for(session, emails)
            view = tickets.view_of(self.desk.key, ticket) if ticket else None
            verdict = classify(facts, directory, view, self.desk.policy)
            ticket = await self._apply(session, message, parsed, verdict, ticket)
            return Outcome(message_id, ticket.number if ticket else None, verdict)

    async def _apply(
        self,
        session,
        message: Message,
        parsed: ParsedMail,
        verdict: Verdict,
        ticket: Ticket | None,
    ) -> Ticket | None:
        desk = self.desk
        lang = desk.config.notices.default_lang
        if verdict.account_id:
            account = await session.get(Account, verdict.account_id)
            lang = account.lang if account else lang
        if verdict.ticket is TicketAction.NEW:
            ticket = await tickets.create_ticket(
                session,
                number_start=desk.config.tickets.number_start,
                authorization=TICKET_AUTHORIZATION[verdict.decision],
                channel=message.channel,
                requester=verdict.sender,
                subject=desk.tags.strip(parsed.subject)[:500],
                account_id=verdict.account_id,
                service_id=verdict.service_id,
                lang=lang,
            )
            act.audit(
                session,
                "ticket.created",
                ticket=ticket,
                message=message,
                decision=verdict.decision.value,
            )
        elif verdict.ticket is TicketAction.NONE:
            ticket = None
        if ticket is not None and verdict.ticket is TicketAction.ATTACH:
            if verdict.reopen and tickets.set_state(ticket, TicketState.OPEN):
                act.audit(session, "ticket.reopened", ticket=ticket, message=message)
            if verdict.authorizes_ticket:
                pending = await act.authorize_ticket(session, desk, ticket)
                act.audit(
                    session,
                    "ticket.authorized",
                    ticket=ticket,
                    message=message,
                    via="code",
                    messages=pending,
                )
            if (
                ticket.account_id is None
                and verdict.account_id
                and verdict.decision in (Decision.AUTHORIZED, Decision.PENDING)
            ):
                ticket.account_id = verdict.account_id
            ticket.updated_at = utcnow()

        message.ticket_id = ticket.id if ticket else None
        message.state = "processed"
        message.processed_at = utcnow()
        message.decision = verdict.decision.value
        message.reasons = [r.value for r in verdict.reasons]
        message.rules_hit = list(verdict.rules_hit)
        message.sender_role = verdict.sender_role.value if verdict.sender_role else None
        message.account_id = verdict.account_id
        message.from_address = verdict.sender
        message.subject = parsed.subject[:2000]
        message.headers = parsed.headers
        message.defects = list(parsed.defects)[:50]
        act.audit(
            session,
            "message.classified",
            ticket=ticket,
            message=message,
            decision=verdict.decision.value,
            reasons=message.reasons,
            rules=message.rules_hit,
        )
        if (
            Reason.BOUNCE in verdict.reasons
            and parsed.facts.delivery_report
            and parsed.facts.null_return_path
        ):
            await suppress_bounced(session, self.desk, message)

        thread = ThreadInfo(parsed.message_id, parsed.references, parsed.thread_index)
        for action in verdict.actions:
            if action.kind is ActionKind.STAFF:
                act.staff_delivery(
                    session,
                    desk,
                    message=message,
                    ticket=ticket,
                    decision=verdict.decision.value,
                    reasons=message.reasons,
                    sender_role=message.sender_role,
                )
            elif ticket is None or action.recipient is None:
                continue
            elif action.kind is ActionKind.AUTH_LINK:
                await act.issue_link(
                    session,
                    desk,
                    ticket=ticket,
                    recipient=action.recipient,
                    thread=thread,
                    message=message,
                )
            elif action.kind is ActionKind.NOTICE:
                await act.customer_mail(
                    session,
                    desk,
                    kind="unauthorized",
                    ticket=ticket,
                    recipient=action.recipient,
                    include_code=action.include_code,
                    thread=thread,
                    message=message,
                    reasons=message.reasons,
                    unshared=list(verdict.unshared[:50]),
                    includes_code=action.include_code,
                    unknown_sender=verdict.sender_role is Role.UNKNOWN,
                )
            elif action.kind is ActionKind.ACKNOWLEDGEMENT:
                await act.customer_mail(
                    session,
                    desk,
                    kind="acknowledgement",
                    ticket=ticket,
                    recipient=action.recipient,
                    include_code=True,
                    thread=thread,
                    message=message,
                    via="panel",
                )
        return ticket

    async def _failed(self, message_id: int, exc: Exception) -> None:
        limit = self.desk.config.processing.max_attempts
        try:
            async with self.db.transaction() as session:
                message = await session.get(Message, message_id)
                if message is None:
                    return
                message.attempts += 1
                message.last_error = f"{type(exc).__name__}: {exc}"[:2000]
                if message.attempts >= limit:
                    message.state = "dead"
                else:
                    delay = self.desk.config.processing.retry_seconds * message.attempts
                    message.next_attempt_at = utcnow() + timedelta(seconds=delay)
                attempts, state = message.attempts, message.state
        except Exception as db_exc:
            self.desk.log.error("message.failed", message=message_id, error=repr(db_exc)[:300])
            raise  # the database is down: the caller backs off instead of spinning
        event = "message.dead_letter" if state == "dead" else "message.failed"
        self.desk.log.error(
            event, message=message_id, attempts=attempts, error=f"{type(exc).__name__}: {exc}"[:500]
        )
        self.desk.metrics.inc("messages_failed_total", state=state)
