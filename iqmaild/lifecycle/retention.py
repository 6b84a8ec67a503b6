"""Retention: personal data purged, claims records and security events deleted, in batches.

What is due is decided by the periods of ``iqmaild.core.retention`` against the
injected clock; the same predicates count (``--dry-run``) and act, so a dry run
says exactly what a run would do. Each batch is one transaction of at most
``batch_size`` rows of its kind; on PostgreSQL tickets are taken with ``SKIP
LOCKED`` (a ticket a worker is filing a message under waits for tomorrow, and
the message it files makes it not due anyway).

Purging keeps the claims record and nothing personal:

- ticket: number, code nonce (its tag), state, authorization, channel, dates;
  requester, subject, account and service are cleared;
- message: ``raw_sha256``, dates, channel, state, decision, reasons, rules,
  sender role; raw bytes, envelope, headers, subject, From, Message-ID (now
  ``purged:<id>``) and errors are cleared;
- outbox row: kind, state, dates, and ``content_sha256`` of what was sent
  (taken when it was queued: the content itself is dropped once the relay took
  it); recipient, content and errors are cleared (rows still queued are left alone);
- audit event: its personal keys are removed (``core.retention.PERSONAL_KEYS``);
- authorization link: the address it was sent to is cleared.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, and_, bindparam, cast, delete, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from iqmaild.clock import Clock
from iqmaild.core.retention import SECURITY_EVENTS, Cutoffs, Periods, cutoffs, strip_personal
from iqmaild.storage.db import Database
from iqmaild.storage.models import (
    AuditEvent,
    AuthToken,
    Message,
    OutboxItem,
    Suppression,
    Ticket,
)

# The kinds a run reports, in the order it handles them.
KINDS = (
    "tickets",
    "messages",
    "outbox",
    "audit_events",
    "auth_tokens",
    "expired_messages",
    "expired_outbox",
    "expired_tickets",
    "expired_audit_events",
    "security_events",
    "security_auth_tokens",
    "suppressions",
)

FINISHED_MAIL = ("sent", "failed", "deleted")  # deleted: by an operator (outbox delete)
LIVE_MAIL = ("queued", "sending", "held")  # held: an operator will act


# -- what is due ---------------------------------------------------------------


def ticket_due(cut: datetime, t: Any = Ticket) -> Any:
    """Not purged yet, and its communication ended before ``cut``: closed or not, no
    message since, no mail of ours since, none still waiting to leave.

    ``t`` is the tickets table (or an alias of it) the condition is about; the
    subqueries use aliases of their own, so nesting never correlates the wrong table.
    """
    m, o = aliased(Message), aliased(OutboxItem)
    recent_message = (
        select(m.id)
        .where(m.ticket_id == t.id, or_(m.received_at >= cut, m.state == "received"))
        .correlate(t)
        .exists()
    )
    live_mail = (
        select(o.id)
        .where(o.ticket_id == t.id, or_(o.created_at >= cut, o.state.in_(LIVE_MAIL)))
        .correlate(t)
        .exists()
    )
    return and_(
        t.purged_at.is_(None),
        t.updated_at < cut,
        or_(t.closed_at.is_(None), t.closed_at < cut),
        ~recent_message,
        ~live_mail,
    )


def gone_tickets(cut: datetime) -> Any:
    """Ids of tickets purged already, or due now (an uncorrelated subquery)."""
    t = aliased(Ticket)
    return select(t.id).where(or_(t.purged_at.is_not(None), ticket_due(cut, t)))


def message_due(cut: datetime) -> Any:
    return and_(
        Message.purged_at.is_(None),
        Message.state.in_(("processed", "dead")),
        or_(
            and_(Message.ticket_id.is_(None), Message.received_at < cut),
            Message.ticket_id.in_(gone_tickets(cut)),
        ),
    )


def outbox_due(cut: datetime) -> Any:
    return and_(
        OutboxItem.purged_at.is_(None),
        OutboxItem.state.in_(FINISHED_MAIL),
        or_(
            and_(OutboxItem.ticket_id.is_(None), OutboxItem.created_at < cut),
            OutboxItem.ticket_id.in_(gone_tickets(cut)),
        ),
    )


def audit_due(cut: datetime) -> Any:
    return and_(
        AuditEvent.purged_at.is_(None),
        or_(
            and_(AuditEvent.ticket_id.is_(None), AuditEvent.ts < cut),
            AuditEvent.ticket_id.in_(gone_tickets(cut)),
        ),
    )


def token_due(cut: datetime) -> Any:
    return and_(AuthToken.email != "", AuthToken.ticket_id.in_(gone_tickets(cut)))


def _expired_ticket(c: Cutoffs) -> Any:
    m, o = aliased(Message), aliased(OutboxItem)
    later_message = (
        select(m.id)
        .where(m.ticket_id == Ticket.id, m.received_at >= c.claims)
        .correlate(Ticket)
        .exists()
    )
    later_mail = (
        select(o.id)
        .where(o.ticket_id == Ticket.id, o.created_at >= c.claims)
        .correlate(Ticket)
        .exists()
    )
    return and_(
        or_(Ticket.purged_at.is_not(None), ticket_due(c.personal)),
        Ticket.updated_at < c.claims,
        ~later_message,
        ~later_mail,
    )


def _rules(c: Cutoffs, now: datetime) -> dict[str, tuple[Any, Any]]:
    """Per kind: (its id column, the condition of its due rows)."""
    return {
        "tickets": (Ticket.id, ticket_due(c.personal)),
        "messages": (Message.id, message_due(c.personal)),
        "outbox": (OutboxItem.id, outbox_due(c.personal)),
        "audit_events": (AuditEvent.id, audit_due(c.personal)),
        "auth_tokens": (AuthToken.id, token_due(c.personal)),
        "expired_messages": (
            Message.id,
            and_(
                Message.received_at < c.claims,
                or_(Message.purged_at.is_not(None), message_due(c.personal)),
            ),
        ),
        "expired_outbox": (
            OutboxItem.id,
            and_(
                OutboxItem.created_at < c.claims,
                or_(OutboxItem.purged_at.is_not(None), outbox_due(c.personal)),
            ),
        ),
        "expired_tickets": (Ticket.id, _expired_ticket(c)),
        "expired_audit_events": (
            AuditEvent.id,
            and_(AuditEvent.event.not_in(SECURITY_EVENTS), AuditEvent.ts < c.claims),
        ),
        "security_events": (
            AuditEvent.id,
            and_(AuditEvent.event.in_(SECURITY_EVENTS), AuditEvent.ts < c.security),
        ),
        "security_auth_tokens": (AuthToken.id, AuthToken.created_at < c.security),
        "suppressions": (Suppression.email, Suppression.until < now),
    }


# -- what purging does (shared with erasure) ----------------------------------------


def _count(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


async def purge_tickets(session: AsyncSession, ids: list[int], now: datetime) -> int:
    if not ids:
        return 0
    result = await session.execute(
        update(Ticket)
        .where(Ticket.id.in_(ids), Ticket.purged_at.is_(None))
        .values(requester=None, subject="", account_id=None, service_id=None, purged_at=now)
    )
    return _count(result)


async def purge_messages(session: AsyncSession, ids: list[int], now: datetime) -> int:
    if not ids:
        return 0
    result = await session.execute(
        update(Message)
        .where(Message.id.in_(ids), Message.purged_at.is_(None))
        .values(
            raw=b"",
            mail_from="",
            rcpt_to=[],
            peer="",
            from_address=None,
            subject="",
            headers={},
            last_error=None,
            account_id=None,
            message_id=literal("purged:") + cast(Message.id, String),
            purged_at=now,
        )
    )
    return _count(result)


async def purge_outbox(session: AsyncSession, ids: list[int], now: datetime) -> int:
    """Blank rows, keeping the SHA-256 of what they sent (taken when they were queued;
    for older rows here, from what content is left)."""
    if not ids:
        return 0
    rows = list(
        await session.execute(
            select(OutboxItem.id, OutboxItem.content_sha256).where(
                OutboxItem.id.in_(ids), OutboxItem.purged_at.is_(None)
            )
        )
    )
    if not rows:
        return 0
    params = []
    for row_id, sha in rows:
        if sha is None:  # one content at a time: a failed row may hold a large mail
            content = await session.scalar(
                select(OutboxItem.content).where(OutboxItem.id == row_id)
            )
            sha = hashlib.sha256(content).hexdigest() if content else None
        params.append({"b_id": row_id, "b_sha": sha})
    table = OutboxItem.__table__
    await session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(
            content=b"",
            recipient="",
            last_error=None,
            content_sha256=bindparam("b_sha"),
            purged_at=now,
        ),
        params,
    )
    return len(rows)


async def purge_audit(
    session: AsyncSession,
    ids: list[int],
    now: datetime,
    clean: Callable[[dict[str, Any]], dict[str, Any]] = strip_personal,
    *,
    mark: bool = True,
) -> int:
    """Take the personal details out of audit events; marked ones are never looked at
    again (``mark=False``: retention still takes the rest later)."""
    if not ids:
        return 0
    rows = list(
        await session.execute(select(AuditEvent.id, AuditEvent.data).where(AuditEvent.id.in_(ids)))
    )
    table = AuditEvent.__table__
    await session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values(data=bindparam("b_data"), **({"purged_at": now} if mark else {})),
        [{"b_id": i, "b_data": clean(dict(data or {}))} for i, data in rows],
    )
    return len(rows)


async def purge_tokens(session: AsyncSession, ids: list[int]) -> int:
    if not ids:
        return 0
    result = await session.execute(update(AuthToken).where(AuthToken.id.in_(ids)).values(email=""))
    return _count(result)


async def _delete(session: AsyncSession, column: Any, ids: list[Any]) -> int:
    if not ids:
        return 0
    result = await session.execute(delete(column.class_).where(column.in_(ids)))
    return _count(result)


# -- the run ---------------------------------------------------------------------


class Retention:
    """One run purges and deletes everything due; ``daily()`` is the daemon's task."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        periods: Periods,
        *,
        batch_size: int,
        log: Any,
    ) -> None:
        self.db = db
        self.clock = clock
        self.periods = periods
        self.batch_size = batch_size
        self.log = log
        self.wakeup = asyncio.Event()
        self.last_counts: dict[str, int] | None = None

    async def due(self) -> dict[str, int]:
        """What a run now would purge or delete, per kind (nothing is changed)."""
        now = self.clock.now()
        rules = _rules(cutoffs(now, self.periods), now)
        out: dict[str, int] = {}
        async with self.db.read() as session:
            for kind in KINDS:
                column, condition = rules[kind]
                count = await session.scalar(select(func.count(column)).where(condition))
                out[kind] = int(count or 0)
        return out

    async def run(self, actor: str = "daemon") -> dict[str, int]:
        """Purge and delete everything due, batch by batch; the counts per kind."""
        now = self.clock.now()
        rules = _rules(cutoffs(now, self.periods), now)
        actions: dict[str, Callable[[AsyncSession, list[Any]], Awaitable[int]]] = {
            "tickets": lambda s, ids: purge_tickets(s, ids, now),
            "messages": lambda s, ids: purge_messages(s, ids, now),
            "outbox": lambda s, ids: purge_outbox(s, ids, now),
            "audit_events": lambda s, ids: purge_audit(s, ids, now),
            "auth_tokens": purge_tokens,
        }
        counts: dict[str, int] = {}
        for kind in KINDS:
            column, condition = rules[kind]
            action = actions.get(kind) or (lambda s, ids, c=column: _delete(s, c, ids))
            counts[kind] = await self._batches(column, condition, action)
        if any(counts.values()):
            async with self.db.transaction(priority="background") as session:
                session.add(
                    AuditEvent(
                        ts=self.clock.now(),
                        event="retention.run",
                        actor=actor[:64],
                        data={k: v for k, v in counts.items() if v},
                    )
                )
        self.log.info("retention.done", actor=actor, **counts)
        self.last_counts = counts
        return counts

    async def _batches(
        self,
        column: Any,
        condition: Any,
        action: Callable[[AsyncSession, list[Any]], Awaitable[int]],
    ) -> int:
        total = 0
        while True:
            async with self.db.transaction(priority="background") as session:
                query = select(column).where(condition).order_by(column).limit(self.batch_size)
                if not self.db.is_sqlite and column.class_ is Ticket:
                    query = query.with_for_update(skip_locked=True)
                ids = list(await session.scalars(query))
                done = await action(session, ids)
            total += done
            if len(ids) < self.batch_size or done == 0:
                return total

    async def daily(
        self,
        every: timedelta = timedelta(days=1),
        first_after: timedelta = timedelta(minutes=10),
        poll_seconds: float = 60.0,
    ) -> None:
        """The daemon's task: a run ``first_after`` start-up and then every day, by the
        injected clock (``wakeup`` makes it look at the clock at once); a failing run
        is logged and tried again in an hour, never ending the task."""
        next_run = self.clock.now() + first_after
        while True:
            now = self.clock.now()
            if now >= next_run:
                try:
                    await self.run()
                    next_run = now + every
                except Exception as exc:
                    self.log.error("retention.failed", error=f"{type(exc).__name__}: {exc}"[:300])
                    next_run = now + timedelta(hours=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_seconds):
                    await self.wakeup.wait()
            self.wakeup.clear()
