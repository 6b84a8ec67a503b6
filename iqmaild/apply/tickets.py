"""Tickets: numbers that are never reused, codes that live only as a nonce.

The classify/apply path works on `TicketRow`s read and written with batched
Core statements; the CLI and the link page use the ORM model. Both carry the
fields the helpers here read (number, code_nonce, state, authorization...).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.core.facts import TicketView
from iqmaild.core.keys import KeyRing
from iqmaild.core.tag import TagFormat, accepted_codes, derive_code
from iqmaild.core.vocabulary import TicketState
from iqmaild.storage.models import Counter, Ticket

COUNTER = "ticket_number"


class HasCode(Protocol):
    number: int
    code_nonce: bytes


@dataclass
class TicketRow:
    """A ticket as the batch sees it; ``dirty`` once the batch changed it."""

    id: int | None
    number: int | None
    code_nonce: bytes
    account_id: str | None
    service_id: str | None
    state: str
    authorization: str
    channel: str
    requester: str | None
    subject: str
    lang: str
    created_at: datetime
    updated_at: datetime
    closed_at: datetime | None = None
    purged_at: datetime | None = None
    dirty: bool = field(default=False, compare=False)

    @classmethod
    def columns(cls) -> list[Any]:
        return [getattr(Ticket, f.name) for f in fields(cls) if f.name != "dirty"]

    def values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("dirty",)}


async def load(
    session: AsyncSession, *, numbers: set[int], ids: set[int], lock: bool
) -> list[TicketRow]:
    """The tickets a batch refers to; locked (PostgreSQL) in id order, so two instances
    working on the same ticket take turns instead of deadlocking."""
    if not numbers and not ids:
        return []
    query = (
        select(*TicketRow.columns())
        .where(or_(Ticket.number.in_(numbers or {-1}), Ticket.id.in_(ids or {-1})))
        .order_by(Ticket.id)
    )
    if lock:
        query = query.with_for_update()
    return [TicketRow(*row) for row in await session.execute(query)]


async def allocate_numbers(
    session: AsyncSession, count: int, start: int, *, sequence: bool
) -> list[int]:
    """``count`` new ticket numbers, never reused; gaps are allowed.

    PostgreSQL takes them from a sequence (instances never wait for each other);
    SQLite, one instance, from a counter row that only grows. A raised
    ``tickets.number_start`` moves either forward.
    """
    if count <= 0:
        return []
    if sequence:
        await session.execute(
            text(
                "SELECT setval('ticket_numbers', :start - 1, true) WHERE "
                "(SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END "
                "FROM ticket_numbers) < :start"
            ),
            {"start": start},
        )
        rows = await session.execute(
            text("SELECT nextval('ticket_numbers') FROM generate_series(1, :n)"), {"n": count}
        )
        return sorted(int(r[0]) for r in rows)
    counter = await session.scalar(select(Counter.value).where(Counter.name == COUNTER))
    if counter is None:
        session.add(Counter(name=COUNTER, value=start - 1))
        await session.flush()
    last = await session.scalar(
        update(Counter)
        .where(Counter.name == COUNTER)
        .values(value=func.max(Counter.value, start - 1) + count)
        .returning(Counter.value)
    )
    assert last is not None
    return list(range(int(last) - count + 1, int(last) + 1))


async def insert_new(session: AsyncSession, rows: list[TicketRow]) -> None:
    """Insert the batch's new tickets (numbers set) and give each its id."""
    if not rows:
        return
    values = [{k: v for k, v in row.values().items() if k != "id"} for row in rows]
    result = await session.execute(
        Ticket.__table__.insert().returning(Ticket.id, sort_by_parameter_order=True), values
    )
    for row, (new_id,) in zip(rows, result, strict=True):
        row.id = new_id


async def update_changed(session: AsyncSession, rows: list[TicketRow]) -> None:
    changed = [row for row in rows if row.dirty and row.id is not None]
    if not changed:
        return
    names = ("code_nonce", "account_id", "state", "updated_at", "closed_at")
    table = Ticket.__table__  # Core: one executemany, no ORM bookkeeping
    await session.execute(
        update(table)
        .where(table.c.id == bindparam("b_id"))
        .values({name: bindparam(f"b_{name}") for name in names}),
        [{"b_id": r.id, **{f"b_{name}": getattr(r, name) for name in names}} for r in changed],
    )


async def by_number(session: AsyncSession, number: int) -> Ticket | None:
    return await session.scalar(select(Ticket).where(Ticket.number == number))


def code_of(key: KeyRing | bytes, ticket: HasCode) -> str:
    """The code mailed now: under the ring's current key."""
    return derive_code(key, ticket.number, ticket.code_nonce)


def view_of(key: KeyRing | bytes, ticket: Any, primary: str | None = None) -> TicketView:
    codes = accepted_codes(key, ticket.number, ticket.code_nonce)
    return TicketView(
        number=ticket.number,
        code=codes[0],
        codes=codes,
        account_id=ticket.account_id,
        service_id=ticket.service_id,
        closed=ticket.state == TicketState.CLOSED.value,
        authorized=ticket.authorization == "authorized",
        requester=ticket.requester,
        primary=primary,
        purged=getattr(ticket, "purged_at", None) is not None,
    )


def tag_for(tags: TagFormat, key: KeyRing | bytes, ticket: HasCode, include_code: bool) -> str:
    """The full tag only where the code may go: callers pass whether it may."""
    if include_code:
        return tags.full(ticket.number, code_of(key, ticket))
    return tags.short(ticket.number)


def set_state(ticket: Any, state: TicketState, now: datetime) -> bool:
    if ticket.state == state.value:
        return False
    ticket.state = state.value
    ticket.closed_at = now if state is TicketState.CLOSED else None
    ticket.updated_at = now
    if hasattr(ticket, "dirty"):
        ticket.dirty = True
    return True
