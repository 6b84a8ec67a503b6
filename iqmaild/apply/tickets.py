"""Tickets: numbers that are never reused, codes that live only as a nonce."""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.core.facts import TicketView
from iqmaild.core.tag import TagFormat, derive_code
from iqmaild.core.vocabulary import TicketState
from iqmaild.storage.models import Counter, Ticket, utcnow

COUNTER = "ticket_number"


async def allocate_number(session: AsyncSession, start: int) -> int:
    """The next ticket number; the counter row is locked for the transaction.

    The counter only grows, so numbers are never reused even after erasure; a
    raised ``tickets.number_start`` moves it forward (gaps are allowed).
    """
    counter = await session.scalar(select(Counter).where(Counter.name == COUNTER).with_for_update())
    if counter is None:
        counter = Counter(name=COUNTER, value=start - 1)
        session.add(counter)
    number = max(counter.value + 1, start)
    counter.value = number
    await session.flush()
    return number


async def create_ticket(
    session: AsyncSession,
    *,
    number_start: int,
    authorization: str,
    channel: str,
    requester: str | None,
    subject: str,
    account_id: str | None,
    service_id: str | None,
    lang: str,
) -> Ticket:
    ticket = Ticket(
        number=await allocate_number(session, number_start),
        code_nonce=secrets.token_bytes(16),
        account_id=account_id,
        service_id=service_id,
        state=TicketState.OPEN.value,
        authorization=authorization,
        channel=channel,
        requester=requester,
        subject=subject,
        lang=lang,
    )
    session.add(ticket)
    await session.flush()
    return ticket


async def by_number(session: AsyncSession, number: int) -> Ticket | None:
    return await session.scalar(select(Ticket).where(Ticket.number == number))


def code_of(key: bytes, ticket: Ticket) -> str:
    return derive_code(key, ticket.number, ticket.code_nonce)


def view_of(key: bytes, ticket: Ticket, primary: str | None = None) -> TicketView:
    return TicketView(
        number=ticket.number,
        code=code_of(key, ticket),
        account_id=ticket.account_id,
        service_id=ticket.service_id,
        closed=ticket.state == TicketState.CLOSED.value,
        authorized=ticket.authorization == "authorized",
        requester=ticket.requester,
        primary=primary,
    )


def tag_for(tags: TagFormat, key: bytes, ticket: Ticket, include_code: bool) -> str:
    """The full tag only where the code may go: callers pass whether it may."""
    if include_code:
        return tags.full(ticket.number, code_of(key, ticket))
    return tags.short(ticket.number)


def set_state(ticket: Ticket, state: TicketState) -> bool:
    if ticket.state == state.value:
        return False
    ticket.state = state.value
    ticket.closed_at = utcnow() if state is TicketState.CLOSED else None
    ticket.updated_at = utcnow()
    return True
