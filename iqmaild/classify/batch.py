"""The classify stage: claimed messages -> parsed facts -> verdicts -> plans, a batch at a time.

Runs on messages already committed, so a crash between intake and here loses
nothing. Up to ``processing.batch_size`` received messages are claimed with a
lease (``SKIP LOCKED`` on PostgreSQL, so instances never take the same ones);
each is parsed once, the batch's tickets, directory entries and returned
outbox rows are read in a few queries, each message is classified in order
(a ticket one message reopens or re-codes is seen so by the next), and the
plans are applied in the same transaction: one commit per batch. A message
that fails on its own is retried alone and, after ``processing.max_attempts``,
parked as a dead letter; a database outage is no attempt at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update

from iqmaild.apply import tickets
from iqmaild.apply.effects import Applier, Claimed, Planned, Returned
from iqmaild.apply.tickets import TicketRow
from iqmaild.clock import Clock
from iqmaild.core.facts import PolicyConfig, ReturnedView
from iqmaild.core.plan import plan_of
from iqmaild.core.policy import Verdict, classify
from iqmaild.core.vocabulary import Channel, MailKind
from iqmaild.metrics import Metrics
from iqmaild.parse.message import ParseContext, ParsedMail, parse_message, unparsable
from iqmaild.storage.db import Database, is_outage
from iqmaild.storage.directory import view_for
from iqmaild.storage.models import Address, Message, OutboxItem


@dataclass(frozen=True)
class Outcome:
    message_id: int
    ticket: int | None
    verdict: Verdict


class Classifier:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        applier: Applier,
        context: ParseContext,
        policy: PolicyConfig,
        *,
        log: Any,
        metrics: Metrics,
        instance: str,
        batch_size: int = 64,
        lease_seconds: float = 300.0,
        max_attempts: int = 5,
        retry_seconds: float = 30.0,
        on_processed: Callable[[], None] | None = None,
    ) -> None:
        self.db = db
        self.clock = clock
        self.applier = applier
        self.context = context
        self.policy = policy
        self.log = log
        self.metrics = metrics
        self.instance = instance
        self.batch_size = batch_size
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.retry_seconds = retry_seconds
        self.wakeup = asyncio.Event()
        self.on_processed = on_processed  # wakes the outbox after every commit
        self.failing_since: float | None = None  # for /healthz: the loop's errors

    def notify(self) -> None:
        self.wakeup.set()

    async def drain(self) -> int:
        """Process every message that is due; returns how many were handled."""
        handled = 0
        while claimed := await self.claim(self.batch_size):
            handled += len(await self.process(claimed))
        return handled

    async def claim(self, limit: int, ids: list[int] | None = None) -> list[Claimed]:
        """Up to ``limit`` due messages (or exactly ``ids``), leased to this instance."""
        now = self.clock.now()
        due = (
            select(Message.id)
            .where(Message.state == "received")
            .where(or_(Message.next_attempt_at.is_(None), Message.next_attempt_at <= now))
            # Unclaimed, a lease that ran out (its instance died), or our own claim
            # that an outage kept us from finishing.
            .where(
                or_(
                    Message.claimed_until.is_(None),
                    Message.claimed_until < now,
                    Message.claimed_by == self.instance,
                )
            )
            .order_by(Message.id)
            .limit(limit)
        )
        if ids is not None:
            due = due.where(Message.id.in_(ids))
        if not self.db.is_sqlite:
            due = due.with_for_update(skip_locked=True)
        async with self.db.transaction(priority="background") as session:
            rows = await session.execute(
                update(Message)
                .where(Message.id.in_(due.scalar_subquery()))
                .values(claimed_by=self.instance, claimed_until=now + self.lease)
                .returning(
                    Message.id,
                    Message.raw,
                    Message.mail_from,
                    Message.rcpt_to,
                    Message.channel,
                    Message.account_id,
                    Message.headers,
                    Message.message_id,
                    Message.attempts,
                )
            )
            claimed = [Claimed(*row) for row in rows]
        return sorted(claimed, key=lambda c: c.id)

    async def release_claims(self, *, everyone: bool = False) -> int:
        """Hand back claimed, unprocessed messages: ours on a graceful stop; everyone's
        where no other instance can be running (SQLite, under the instance lock)."""
        query = update(Message).where(Message.state == "received", Message.claimed_by.is_not(None))
        if not everyone:
            query = query.where(Message.claimed_by == self.instance)
        async with self.db.transaction(priority="background") as session:
            result = await session.execute(query.values(claimed_by=None, claimed_until=None))
            return int(getattr(result, "rowcount", 0) or 0)

    async def process(self, claimed: list[Claimed]) -> list[Outcome]:
        """Classify and apply a claimed batch; one that fails is retried one by one."""
        # One hand-off for the whole batch: a pathological message must not stall
        # the event loop (SMTP, HTTP) while it is parsed.
        started = self.clock.monotonic()
        parsed = await asyncio.to_thread(lambda: [self._parse(c) for c in claimed])
        try:
            outcomes = await self._batch(list(zip(claimed, parsed, strict=True)))
        except Exception as exc:
            if is_outage(exc) or len(claimed) == 1:
                await self._failed(claimed, exc)
                return []
            outcomes = []
            for one, facts in zip(claimed, parsed, strict=True):
                try:
                    outcomes += await self._batch([(one, facts)])
                except Exception as single:
                    await self._failed([one], single)
        if outcomes:
            elapsed = self.clock.monotonic() - started
            self.metrics.observe("stage_seconds", elapsed, stage="classify")
        for outcome in outcomes:
            v = outcome.verdict
            self.log.info(
                "message.classified",
                message=outcome.message_id,
                ticket=outcome.ticket,
                decision=v.decision.value,
                reasons=[r.value for r in v.reasons],
                sender_role=v.sender_role.value if v.sender_role else None,
                rules=list(v.rules_hit),
                account=v.account_id,
            )
            self.metrics.inc("messages_classified_total", decision=v.decision.value)
            for reason in v.reasons or ("none",):
                self.metrics.inc("message_reasons_total", decision=v.decision.value, reason=reason)
        if outcomes and self.on_processed is not None:
            self.on_processed()
        return outcomes

    async def process_one(self, message_id: int) -> Outcome | None:
        """Claim and process one message now (the panel answers with its ticket)."""
        claimed = await self.claim(1, ids=[message_id])
        if not claimed:
            return None
        outcomes = await self.process(claimed)
        return outcomes[0] if outcomes else None

    def _parse(self, claimed: Claimed) -> ParsedMail:
        channel = Channel(claimed.channel)
        try:
            parsed = parse_message(
                claimed.raw,
                mail_from=claimed.mail_from,
                rcpt_to=claimed.rcpt_to,
                ctx=self.context,
                channel=channel,
            )
        except Exception as exc:  # e.g. RecursionError on absurd MIME nesting
            self.log.warning("message.unparsable", message=claimed.id, error=type(exc).__name__)
            parsed = unparsable(
                claimed.raw,
                channel=channel,
                error=exc,
                mail_from=claimed.mail_from,
                rcpt_to=claimed.rcpt_to,
                ctx=self.context,
            )
        if channel is Channel.PANEL:
            facts = replace(
                parsed.facts,
                panel_account_id=claimed.account_id,
                panel_service_id=(claimed.headers or {}).get("panel_service") or None,
            )
            parsed = replace(parsed, facts=facts)
        return parsed

    async def _batch(self, work: list[tuple[Claimed, ParsedMail]]) -> list[Outcome]:
        async with self.db.transaction(priority="background") as session:
            context = await _Context.load(session, work, lock=not self.db.is_sqlite)
            planned: list[Planned] = []
            for claimed, parsed in work:
                facts = parsed.facts
                if context.seen_with_fewer_hops(claimed, facts.hops):
                    facts = replace(facts, seen_before=True)
                returned = context.returned.get(facts.returned_outbox_id or 0)
                row = context.ticket_for(facts, returned)
                view = tickets.view_of(self.context.key, row, context.primary(row)) if row else None
                returned_view = (
                    ReturnedView(MailKind(returned.kind), returned.reported_at is not None)
                    if returned is not None
                    else None
                )
                verdict = classify(facts, context.directory, view, self.policy, returned_view)
                entry = Planned(
                    claimed, parsed, plan_of(verdict, facts.returned_outbox_id), row, returned
                )
                self.applier.advance(entry)
                if entry.plan.staff_copy and returned is not None:
                    returned.reported_at = self.clock.now()  # copied once per row, also in a batch
                planned.append(entry)
            await self.applier.execute(session, planned, self.instance)
        return [
            Outcome(p.message.id, p.ticket.number if p.ticket else None, p.plan.verdict)
            for p in planned
        ]

    async def _failed(self, claimed: list[Claimed], exc: Exception) -> None:
        error = f"{type(exc).__name__}: {exc}"[:2000].replace("\x00", "\\x00")
        if is_outage(exc):
            # The database, not the message: no attempt is counted (a long outage
            # must not park good mail as dead letters); the loop backs off.
            self.log.error("message.deferred", messages=[c.id for c in claimed][:20])
            raise exc
        now = self.clock.now()
        for one in claimed:
            attempts = one.attempts + 1
            dead = attempts >= self.max_attempts
            values: dict[str, Any] = {
                "attempts": attempts,
                "last_error": error,
                "claimed_by": None,
                "claimed_until": None,
            }
            if dead:
                values["state"] = "dead"
            else:
                values["next_attempt_at"] = now + timedelta(seconds=self.retry_seconds * attempts)
            async with self.db.transaction() as session:
                await session.execute(update(Message).where(Message.id == one.id).values(values))
            event = "message.dead_letter" if dead else "message.failed"
            self.log.error(event, message=one.id, attempts=attempts, error=error[:500])
            self.metrics.inc("messages_failed_total", state="dead" if dead else "received")


class _Context:
    """What a batch's messages refer to, read in a few queries."""

    def __init__(self) -> None:
        self.by_number: dict[int, TicketRow] = {}
        self.by_id: dict[int, TicketRow] = {}
        self.primaries: dict[str, str] = {}
        self.returned: dict[int, Returned] = {}
        self.directory: Any = None
        self.earlier: dict[str, list[int]] = {}  # Message-ID -> hops of processed messages

    @classmethod
    async def load(
        cls, session: Any, work: list[tuple[Claimed, ParsedMail]], *, lock: bool
    ) -> _Context:
        ctx = cls()
        facts = [p.facts for _, p in work]
        returned_ids = {f.returned_outbox_id for f in facts if f.returned_outbox_id}
        if returned_ids:
            rows = await session.execute(
                select(
                    OutboxItem.id,
                    OutboxItem.kind,
                    OutboxItem.ticket_id,
                    OutboxItem.recipient,
                    OutboxItem.reported_at,
                ).where(OutboxItem.id.in_(returned_ids))
            )
            ctx.returned = {row[0]: Returned(*row) for row in rows}
        numbers = {
            n
            for f in facts
            if not f.returned_outbox_id
            for n in [f.tag.number if f.tag else f.thread_ticket]
            if n
        }
        ids = {r.ticket_id for r in ctx.returned.values() if r.ticket_id}
        for row in await tickets.load(session, numbers=numbers, ids=ids, lock=lock):
            ctx.by_id[row.id or 0] = row
            if row.number is not None:
                ctx.by_number[row.number] = row
        accounts = {r.account_id for r in ctx.by_id.values() if r.account_id}
        if accounts:
            rows = await session.execute(
                select(Address.account_id, Address.email).where(
                    Address.account_id.in_(accounts), Address.role == "primary"
                )
            )
            ctx.primaries = {account: email for account, email in rows}
        emails = {e for f in facts for e in (*f.from_addresses, *f.recipients)}
        emails |= {r.requester for r in ctx.by_id.values() if r.requester}
        emails |= set(ctx.primaries.values())
        ctx.directory = await view_for(session, emails)
        message_ids = {c.message_id for c, _ in work if c.message_id}
        if message_ids:
            rows = await session.execute(
                select(Message.message_id, Message.headers).where(
                    Message.message_id.in_(message_ids),
                    Message.state == "processed",
                    Message.id < max(c.id for c, _ in work),
                )
            )
            for message_id, headers in rows:
                hops = str((headers or {}).get("hops", ""))
                if hops.isdigit():
                    ctx.earlier.setdefault(message_id, []).append(int(hops))
        return ctx

    def ticket_for(self, facts: Any, returned: Returned | None) -> TicketRow | None:
        if facts.returned_outbox_id is not None:
            return self.by_id.get(returned.ticket_id or 0) if returned else None
        number = facts.tag.number if facts.tag else facts.thread_ticket
        return self.by_number.get(number) if number else None

    def primary(self, row: TicketRow) -> str | None:
        return self.primaries.get(row.account_id or "")

    def seen_with_fewer_hops(self, claimed: Claimed, hops: int) -> bool:
        """This Message-ID was processed before and now comes back through more hops:
        our staff copy returned by a forwarder that stripped our marks (a loop)."""
        return any(earlier < hops for earlier in self.earlier.get(claimed.message_id, ()))
