"""Bounces of our own mail: a permanent failure pauses automatic mail to that address."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.outbound.dsn import permanent_failures, returned_message_id
from iqmaild.process import act
from iqmaild.process.desk import Desk
from iqmaild.storage.models import Message, OutboxItem, Suppression, utcnow


async def suppress_bounced(session: AsyncSession, desk: Desk, message: Message) -> None:
    """A permanent failure of mail we sent stops automatic mail to that address.

    Only a report that returns one of our own messages counts, and only for
    the recipient that message went to: a forged report cannot silence an
    arbitrary customer.
    """
    returned = returned_message_id(message.raw)
    if returned is None:
        return
    sent = await session.scalar(
        select(OutboxItem).where(OutboxItem.header_message_id == returned).limit(1)
    )
    if sent is None:
        return
    hours = desk.config.outbound.bounce_suppress_hours
    for address, status in permanent_failures(message.raw):
        if address != sent.recipient:
            continue
        until = utcnow() + timedelta(hours=hours)
        row = await session.get(Suppression, address)
        if row is None:
            session.add(Suppression(email=address, reason=status, until=until))
        else:
            row.until, row.reason = until, status
        act.audit(session, "suppression.added", message=message, email=address, status=status)
