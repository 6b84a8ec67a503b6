"""Operators' hands on the outbox, like Postfix's ``postqueue``/``postsuper``.

Every change is a conditional UPDATE on the row's state, so a row the running
daemon claims meanwhile (``sending``: on the wire) is never touched behind its
back; what could not be changed is reported with its reason. The daemon needs
no signal: its outbox polls for due rows (``processing.poll_seconds``), so mail
released or flushed here leaves within that time.

States: ``queued`` (due at its next attempt; *deferred* when an attempt failed
before, which ``--state deferred`` lists), ``held`` (an operator stopped it),
``sending``, ``sent``, ``failed`` (given up, or refused for good), ``deleted``
(by an operator, or superseded by a newer link; content blanked, the row kept
so a late bounce still finds it). ``suppressed`` mail never became a row: the
audit log says which rule stopped it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.core.vocabulary import MailKind
from iqmaild.storage.db import Database
from iqmaild.storage.models import AuditEvent, AuthToken, OutboxItem, Ticket

STATES = ("queued", "deferred", "held", "sending", "sent", "failed", "deleted", "suppressed")


def shown_state(state: str, attempts: int) -> str:
    """``deferred`` is a queued row that was tried before."""
    return "deferred" if state == "queued" and attempts > 0 else state


def _where_state(state: str) -> Any:
    if state == "queued":
        return and_(OutboxItem.state == "queued", OutboxItem.attempts == 0)
    if state == "deferred":
        return and_(OutboxItem.state == "queued", OutboxItem.attempts > 0)
    return OutboxItem.state == state


async def list_rows(db: Database, state: str, limit: int, now: datetime) -> list[dict[str, Any]]:
    """Newest first; ``suppressed`` lists mail the filter stopped, with its rule."""
    if state == "suppressed":
        return await _suppressed(db, limit)
    query = (
        select(OutboxItem, Ticket.number)
        .outerjoin(Ticket, Ticket.id == OutboxItem.ticket_id)
        .order_by(OutboxItem.id.desc())
        .limit(limit)
    )
    if state != "all":
        query = query.where(_where_state(state))
    out = []
    async with db.read() as session:
        for row, number in await session.execute(query):
            next_attempt = ""
            if row.state == "queued":
                due = row.next_attempt_at
                next_attempt = "now" if due <= now else due.isoformat(timespec="seconds")
            out.append(
                {
                    "id": row.id,
                    "ticket": number,
                    "kind": row.kind,
                    "state": row.state,  # as stored: scripts read it
                    "deferred": shown_state(row.state, row.attempts) == "deferred",
                    "recipient": row.recipient,
                    "attempts": row.attempts,
                    "next_attempt": next_attempt,
                    "created": row.created_at.isoformat(timespec="seconds"),
                    "sent": row.sent_at.isoformat(timespec="seconds") if row.sent_at else "",
                    "last_error": (row.last_error or "").replace("\n", " "),
                }
            )
    return out


async def _suppressed(db: Database, limit: int) -> list[dict[str, Any]]:
    query = (
        select(AuditEvent, Ticket.number)
        .outerjoin(Ticket, Ticket.id == AuditEvent.ticket_id)
        .where(AuditEvent.event == "autoreply.suppressed")
        .order_by(AuditEvent.id.desc())
        .limit(limit)
    )
    async with db.read() as session:
        return [
            {
                "id": f"s{event.id}",  # an audit event, not an outbox row
                "ticket": number,
                "kind": (event.data or {}).get("kind", ""),
                "state": "suppressed",
                "recipient": (event.data or {}).get("recipient", ""),
                "rule": (event.data or {}).get("why", ""),
                "message": event.message_id,
                "created": event.ts.isoformat(timespec="seconds"),
            }
            for event, number in await session.execute(query)
        ]


@dataclass
class Outcome:
    """Which rows changed, and why the others did not."""

    changed: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)


# What each action may change, and what it makes of it.
_FROM = {
    "hold": ("queued",),
    "release": ("held",),
    "retry": ("queued", "failed", "held"),
    "delete": ("queued", "failed", "held"),
}


async def act(
    db: Database, action: str, ids: Iterable[int], now: datetime, actor: str = "cli"
) -> Outcome:
    """hold, release, retry or delete the given rows, in one transaction."""
    wanted = sorted(set(ids))
    outcome = Outcome()
    allowed = _FROM[action]
    async with db.transaction() as session:
        rows = {
            row.id: row
            for row in await session.execute(
                select(
                    OutboxItem.id,
                    OutboxItem.kind,
                    OutboxItem.state,
                    OutboxItem.attempts,
                    func.length(OutboxItem.content).label("size"),
                ).where(OutboxItem.id.in_(wanted))
            )
        }
        for row_id in wanted:
            row = rows.get(row_id)
            if row is None:
                outcome.skipped[row_id] = "no such row"
                continue
            if row.state not in allowed:
                outcome.skipped[row_id] = f"is {shown_state(row.state, row.attempts)}"
                continue
            if action == "retry" and not row.size:
                outcome.skipped[row_id] = _blank_reason(row.kind)
                continue
            result = await session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == row_id, OutboxItem.state == row.state)
                .values(**_values(action, now, row.state))
            )
            if not getattr(result, "rowcount", 0):
                outcome.skipped[row_id] = "changed meanwhile (the daemon claimed it)"
                continue
            if action == "delete" and row.kind == MailKind.AUTH_REQUEST.value:
                await _spend_links(session, [row_id], now)
            outcome.changed.append(row_id)
        if outcome.changed:
            session.add(
                AuditEvent(
                    ts=now,
                    event=f"outbox.{action}",
                    actor=actor,
                    data={"outbox": outcome.changed[:1000], "rows": len(outcome.changed)},
                )
            )
    return outcome


def _blank_reason(kind: str) -> str:
    if kind == MailKind.AUTH_REQUEST.value:
        return "its link was spent when it failed: use `ticket resend-link N`"
    return "its content is gone (blanked)"


def _values(action: str, now: datetime, state: str) -> dict[str, Any]:
    if action == "hold":
        return {"state": "held"}
    if action == "delete":
        return {"state": "deleted", "content": b"", "last_error": "deleted by an operator"}
    # release, retry: due now. A deferred row keeps its attempts (its backoff goes
    # on); a failed one starts again (its lifetime still counts from its creation).
    values: dict[str, Any] = {"state": "queued", "next_attempt_at": now}
    if state == "failed":
        values["attempts"] = 0
    return values


async def flush(db: Database, now: datetime, actor: str = "cli") -> int:
    """Every deferred row due now (Postfix's ``postqueue -f``)."""
    async with db.transaction() as session:
        result = await session.execute(
            update(OutboxItem)
            .where(OutboxItem.state == "queued", OutboxItem.next_attempt_at > now)
            .values(next_attempt_at=now)
        )
        count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            session.add(AuditEvent(ts=now, event="outbox.flush", actor=actor, data={"rows": count}))
    return count


async def retry_all_failed(db: Database, now: datetime, actor: str = "cli") -> tuple[int, int]:
    """Every failed row that can still be sent; (queued again, left: blanked links)."""
    async with db.transaction() as session:
        result = await session.execute(
            update(OutboxItem)
            .where(OutboxItem.state == "failed", func.length(OutboxItem.content) > 0)
            .values(state="queued", next_attempt_at=now, attempts=0)
        )
        count = int(getattr(result, "rowcount", 0) or 0)
        left = await session.scalar(
            select(func.count(OutboxItem.id)).where(OutboxItem.state == "failed")
        )
        if count:
            session.add(AuditEvent(ts=now, event="outbox.retry", actor=actor, data={"rows": count}))
    return count, int(left or 0)


async def supersede_links(session: AsyncSession, ticket_id: int, now: datetime) -> list[int]:
    """Link mails of a ticket not sent yet: deleted (their links are spent anyway)."""
    waiting = or_(OutboxItem.state == "queued", OutboxItem.state == "held")
    ids = list(
        await session.scalars(
            select(OutboxItem.id).where(
                OutboxItem.ticket_id == ticket_id,
                OutboxItem.kind == MailKind.AUTH_REQUEST.value,
                waiting,
            )
        )
    )
    if ids:
        await session.execute(
            update(OutboxItem)
            .where(OutboxItem.id.in_(ids), waiting)
            .values(state="deleted", content=b"", last_error="superseded by a new link")
        )
        await _spend_links(session, ids, now)
    return ids


async def _spend_links(session: AsyncSession, outbox_ids: list[int], now: datetime) -> None:
    await session.execute(
        update(AuthToken)
        .where(AuthToken.outbox_id.in_(outbox_ids), AuthToken.used_at.is_(None))
        .values(used_at=now)
    )
