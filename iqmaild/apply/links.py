"""Confirming an authorization link: one atomic state change.

The token row is claimed with a conditional UPDATE (unused and unexpired), so
double clicks and several instances confirm at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update

from iqmaild.apply import effects as act
from iqmaild.apply.desk import Desk
from iqmaild.core.mail import Acknowledgement, MailIntent
from iqmaild.core.text import message_ids
from iqmaild.core.vocabulary import MailKind
from iqmaild.deliver.compose import ThreadInfo
from iqmaild.storage.db import Database
from iqmaild.storage.directory import view_for
from iqmaild.storage.models import AuthToken, Message, Ticket, utcnow


class LinkState(StrEnum):
    VALID = "valid"
    NOT_FOUND = "not_found"
    USED = "used"
    EXPIRED = "expired"


@dataclass(frozen=True)
class LinkInfo:
    state: LinkState
    ticket_number: int | None = None
    subject: str = ""
    sender: str = ""
    lang: str = "pl"


def _plausible(token: str) -> bool:
    return 20 <= len(token) <= 100 and all(c.isalnum() or c in "-_" for c in token)


async def inspect(db: Database, token: str) -> LinkInfo:
    """What the GET page shows; changes nothing (scanners pre-fetch links)."""
    if not _plausible(token):
        return LinkInfo(LinkState.NOT_FOUND)
    async with db.read() as session:
        row = await session.scalar(
            select(AuthToken).where(AuthToken.token_hash == act.token_hash(token))
        )
        if row is None:
            return LinkInfo(LinkState.NOT_FOUND)
        ticket = await session.get(Ticket, row.ticket_id)
        info = dict(
            ticket_number=ticket.number if ticket else None,
            subject=ticket.subject if ticket else "",
            sender=row.email,
            lang=ticket.lang if ticket else "pl",
        )
        if row.used_at is not None:
            return LinkInfo(LinkState.USED, **info)
        if row.expires_at <= utcnow():
            return LinkInfo(LinkState.EXPIRED, **info)
        return LinkInfo(LinkState.VALID, **info)


async def _still_eligible(session: Any, email: str, ticket: Ticket) -> bool:
    """The address may still act on the ticket's account and service."""
    if ticket.account_id is None:
        return False
    directory = await view_for(session, [email])
    return directory.may_act(email, ticket.account_id, ticket.service_id, ticket.requester)


async def confirm(db: Database, desk: Desk, token: str) -> LinkInfo:
    """Authorize the ticket behind the token, once."""
    info = await inspect(db, token)
    if info.state is not LinkState.VALID:
        return info
    current = utcnow()
    async with db.transaction() as session:
        result = await session.execute(
            update(AuthToken)
            .where(
                AuthToken.token_hash == act.token_hash(token),
                AuthToken.used_at.is_(None),
                AuthToken.expires_at > current,
            )
            .values(used_at=current)
            .returning(AuthToken.ticket_id, AuthToken.email, AuthToken.message_id)
        )
        claimed = result.first()
        if claimed is None:
            return LinkInfo(
                LinkState.USED, info.ticket_number, info.subject, info.sender, info.lang
            )
        ticket = await session.get(Ticket, claimed.ticket_id, with_for_update=True)
        if ticket is None:
            return LinkInfo(LinkState.NOT_FOUND)
        if not await _still_eligible(session, claimed.email, ticket):
            # The share was revoked or the primary address changed since the link
            # went out: the token is spent and nothing is authorized.
            act.audit(
                session,
                "authlink.refused",
                ticket=ticket,
                actor="link",
                email=claimed.email,
                why="not_eligible",
            )
            number = None
        else:
            number = await _authorize(session, desk, ticket, claimed.email, claimed.message_id)
    if number is None:
        desk.log.info("authlink.refused", ticket=info.ticket_number, why="not_eligible")
        return LinkInfo(LinkState.EXPIRED, info.ticket_number, info.subject, info.sender, info.lang)
    desk.log.info("authlink.confirmed", ticket=number)
    desk.metrics.inc("authlinks_confirmed_total")
    return LinkInfo(LinkState.VALID, number, info.subject, info.sender, info.lang)


async def _authorize(
    session: Any, desk: Desk, ticket: Ticket, email: str, message_id: int | None
) -> int:
    """Inside the claiming transaction: authorize, audit, acknowledge.

    The acknowledgement is the first mail that carries the code, and it
    threads under the customer's message the link was issued for.
    """
    was = ticket.authorization
    pending = await act.authorize_ticket(session, desk, ticket)
    act.audit(
        session,
        "authlink.confirmed",
        ticket=ticket,
        actor="link",
        email=email,
        was=was,
        messages=pending,
    )
    thread = None
    origin = await session.get(Message, message_id) if message_id else None
    if origin is not None:
        ids = message_ids(origin.message_id)
        thread = ThreadInfo(ids[0] if ids else "", (), None)
    intent = MailIntent(MailKind.ACKNOWLEDGEMENT, email, True, Acknowledgement("link"))
    # The owner's own click: no rate limit may withhold the code from them.
    await act.customer_mail(
        session, desk, intent, ticket=ticket, thread=thread, message=origin, check_limits=False
    )
    return ticket.number
