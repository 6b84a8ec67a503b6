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
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import defer

from iqmaild.apply import tickets
from iqmaild.apply.desk import Desk
from iqmaild.apply.effects import apply_plan
from iqmaild.core.facts import ReturnedView
from iqmaild.core.plan import plan_of
from iqmaild.core.policy import Verdict, classify
from iqmaild.core.vocabulary import Channel, MailKind
from iqmaild.parse.message import parse_message, unparsable
from iqmaild.storage.db import Database, is_outage
from iqmaild.storage.directory import primary_of, view_for
from iqmaild.storage.models import Message, OutboxItem, Ticket, utcnow


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
        self.failing_since: float | None = None  # for /healthz: the loop's errors

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
            rcpt_to = list(row.rcpt_to or [])
            stored_id = row.message_id
            panel_account, panel_service = row.account_id, (row.headers or {}).get("panel_service")
        try:
            # In a thread: a pathological message must not stall SMTP and HTTP.
            parsed = await asyncio.to_thread(
                parse_message,
                raw,
                mail_from=mail_from,
                rcpt_to=rcpt_to,
                ctx=self.desk.parse_context,
                channel=channel,
            )
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
            # Its raw bytes are in hand already: not a second copy of a 20 MB message.
            message = await session.get(
                Message, message_id, with_for_update=True, options=[defer(Message.raw)]
            )
            if message is None or message.state != "received":
                return None
            facts = parsed.facts
            seen = stored_id and await self._seen_fewer_hops(session, message_id, stored_id, facts)
            if seen:
                facts = replace(facts, seen_before=True)
            returned = ticket = None
            if facts.returned_outbox_id is not None:
                returned = await session.get(OutboxItem, facts.returned_outbox_id)
                if returned is not None and returned.ticket_id is not None:
                    ticket = await session.get(Ticket, returned.ticket_id)
            else:
                number = facts.tag.number if facts.tag else facts.thread_ticket
                ticket = await tickets.by_number(session, number) if number else None
            primary = None
            if ticket is not None and ticket.account_id:
                primary = await primary_of(session, ticket.account_id)
            emails = [*facts.from_addresses, *facts.recipients]
            emails += [e for e in (ticket.requester if ticket else None, primary) if e]
            directory = await view_for(session, emails)
            view = tickets.view_of(self.desk.key, ticket, primary) if ticket else None
            returned_view = (
                ReturnedView(MailKind(returned.kind), returned.reported_at is not None)
                if returned is not None
                else None
            )
            verdict = classify(facts, directory, view, self.desk.policy, returned_view)
            plan = plan_of(verdict, facts.returned_outbox_id)
            ticket = await apply_plan(
                session,
                self.desk,
                plan,
                message=message,
                raw=raw,
                parsed=parsed,
                ticket=ticket,
                returned=returned,
            )
            return Outcome(message_id, ticket.number if ticket else None, verdict)

    async def _seen_fewer_hops(
        self, session: Any, message_id: int, stored_id: str, facts: Any
    ) -> bool:
        """This Message-ID was processed before and now comes back through more hops:
        our staff copy returned by a forwarder that stripped our marks (a loop)."""
        earlier = await session.scalars(
            select(Message.headers)
            .where(Message.message_id == stored_id, Message.id < message_id)
            .where(Message.state == "processed")
            .limit(5)
        )
        for headers in earlier:
            hops = (headers or {}).get("hops")
            if hops is not None and str(hops).isdigit() and int(hops) < facts.hops:
                return True
        return False

    async def _failed(self, message_id: int, exc: Exception) -> None:
        if is_outage(exc):
            # The database, not the message: no attempt is counted (a long outage
            # must not park good mail as dead letters); the loop backs off.
            self.desk.log.error(
                "message.deferred", message=message_id, error=f"{type(exc).__name__}"[:300]
            )
            raise exc
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
