"""IMAP mode's state in the database: how far a folder was taken, what awaits filing.

The last UID and the messages to file are written by ``GroupCommitter.store_batch``
in the transaction that stores the messages (``recorder``), so the folder's
progress never runs ahead of, or behind, what was stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from iqmaild.persist.store import Stored
from iqmaild.storage.db import Database
from iqmaild.storage.models import ImapFiling, ImapMailbox, Message, Ticket


@dataclass(frozen=True)
class Ready:
    """A stored message in the watched folder whose processing has ended."""

    uid: int
    message: int
    state: str
    decision: str | None
    ticket_number: int | None


def _insert(db: Database) -> Any:
    return (sqlite if db.is_sqlite else postgresql).insert


async def load(db: Database, mailbox: str) -> tuple[int, int] | None:
    """(UIDVALIDITY, last UID) committed for this folder, or None."""
    async with db.read() as session:
        row = await session.get(ImapMailbox, mailbox)
        return None if row is None else (row.uidvalidity, row.last_uid)


async def start_over(db: Database, mailbox: str, uidvalidity: int, now: datetime) -> None:
    """A new UIDVALIDITY (or a first start): from the folder's first UID again.

    Waiting filings of the old UID space are dropped: those UIDs mean nothing
    now; the messages come again and the delivery index finds them stored.
    """
    async with db.transaction(priority="normal") as session:
        await session.execute(delete(ImapFiling).where(ImapFiling.mailbox == mailbox))
        statement = _insert(db)(ImapMailbox).values(
            mailbox=mailbox, uidvalidity=uidvalidity, last_uid=0, updated_at=now
        )
        await session.execute(
            statement.on_conflict_do_update(
                index_elements=["mailbox"],
                set_={"uidvalidity": uidvalidity, "last_uid": 0, "updated_at": now},
            )
        )


def recorder(
    db: Database,
    mailbox: str,
    uidvalidity: int,
    uids: list[int],
    last_uid: int,
    now: datetime,
) -> Callable[[Any, list[Stored]], Awaitable[None]]:
    """What commits with a fetched batch: its UIDs to file, and the last UID taken
    (``last_uid`` covers UIDs of the batch that vanished before the fetch)."""

    async def record(session: Any, stored: list[Stored]) -> None:
        rows = [
            {
                "mailbox": mailbox,
                "uidvalidity": uidvalidity,
                "uid": uid,
                "message_id": item.id,
                "created_at": now,
                "attempts": 0,
            }
            for uid, item in zip(uids, stored, strict=True)
        ]
        if rows:
            await session.execute(
                _insert(db)(ImapFiling).on_conflict_do_nothing(
                    index_elements=["mailbox", "uidvalidity", "uid"]
                ),
                rows,
            )
        await session.execute(
            update(ImapMailbox)
            .where(ImapMailbox.mailbox == mailbox, ImapMailbox.uidvalidity == uidvalidity)
            .values(
                last_uid=case(
                    (ImapMailbox.last_uid > last_uid, ImapMailbox.last_uid), else_=last_uid
                ),
                updated_at=now,
            )
        )

    return record


async def waiting(db: Database, mailbox: str, uidvalidity: int) -> int:
    async with db.read() as session:
        count = await session.scalar(
            select(func.count())
            .select_from(ImapFiling)
            .where(ImapFiling.mailbox == mailbox, ImapFiling.uidvalidity == uidvalidity)
        )
        return int(count or 0)


async def ready(db: Database, mailbox: str, uidvalidity: int, limit: int) -> list[Ready]:
    """Messages of this folder whose processing ended (processed or dead), oldest first."""
    async with db.read() as session:
        rows = await session.execute(
            select(ImapFiling.uid, Message.id, Message.state, Message.decision, Ticket.number)
            .join(Message, Message.id == ImapFiling.message_id)
            .outerjoin(Ticket, Ticket.id == Message.ticket_id)
            .where(
                ImapFiling.mailbox == mailbox,
                ImapFiling.uidvalidity == uidvalidity,
                Message.state.in_(("processed", "dead")),
            )
            .order_by(ImapFiling.uid)
            .limit(limit)
        )
        return [Ready(*row) for row in rows]


async def filed(db: Database, mailbox: str, uidvalidity: int, uids: list[int]) -> None:
    # Not background: behind a busy outbox's writes, moved mail would be moved again.
    async with db.transaction(priority="normal") as session:
        await session.execute(
            delete(ImapFiling).where(
                ImapFiling.mailbox == mailbox,
                ImapFiling.uidvalidity == uidvalidity,
                ImapFiling.uid.in_(uids),
            )
        )


async def filing_failed(
    db: Database, mailbox: str, uidvalidity: int, uids: list[int], error: str
) -> None:
    async with db.transaction(priority="background") as session:
        await session.execute(
            update(ImapFiling)
            .where(
                ImapFiling.mailbox == mailbox,
                ImapFiling.uidvalidity == uidvalidity,
                ImapFiling.uid.in_(uids),
            )
            .values(attempts=ImapFiling.attempts + 1, last_error=error[:2000])
        )
