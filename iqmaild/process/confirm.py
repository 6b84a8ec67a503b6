"""Confirming an authorization link: one atomic state change.

The token row is claimed with a conditional UPDATE (unused and unexpired), so
double clicks and several instances confirm at most once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select, update

from iqmaild.process import act
from iqmaild.process.desk import Desk
from iqmaild.storage.db import Database
from iqmaild.storage.models import AuthToken, Ticket, utcnow


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
            .returning(AuthToken.ticket_id, AuthToken.email)
        )
        claimed = result.first()
        if claimed is None:
            return LinkInfo(
                LinkState.USED, info.ticket_number, info.subject, info.sender, info.lang
            )
        ticket = await session.get(Ticket, claimed.ticket_id, with_for_update=True)
        if ticket is None:
            return LinkInfo(LinkState.NOT_FOUND)
        was = ticket.authorization
        pending = await act.authorize_ticket(session, desk, ticket)
        act.audit(
            session,
            "authlink.confirmed",
            ticket=ticket,
            actor="link",
            email=claimed.email,
            was=was,
            messages=pending,
        )
        await act.customer_mail(
            session,
            desk,
            kind="acknowledgement",
            ticket=ticket,
            recipient=claimed.email,
            include_code=True,
            thread=None,
            via="link",
        )
        number = ticket.number
    desk.log.info("authlink.confirmed", ticket=number, messages=pending)
    desk.metrics.inc("authlinks_confirmed_total")
    return LinkInfo(LinkState.VALID, number, info.subject, info.sender, info.lang)
