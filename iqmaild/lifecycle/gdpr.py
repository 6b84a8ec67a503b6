"""The data subject's rights (RODO/GDPR art. 15, 17, 20): a copy of every record about
an address, and its erasure in one transaction.

An address is found as the rules see it (``core.addresses.normalize``: IDNA
domain, case-insensitive local part): as a ticket's requester, in From, To or
Cc of a stored message (parsed from the raw bytes, as stored) or its envelope
sender, as the recipient of our mail, in authorization links, in audit details,
in suppressions and in the directory. Retention bounds the messages scanned to
those not purged yet (about three months of mail).

Erasure purges like retention (the claims record of numbers, dates, decisions
and hashes stays; art. 17(3)(e)), deletes links, suppressions and the directory
entries of the address, and takes the address out of every other audit event.
Each command writes an audit event of its own: who, when, the counts; never
the address.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Text, cast, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from iqmaild.core.addresses import normalize
from iqmaild.core.retention import erase_from, mentions, strip_personal
from iqmaild.lifecycle.retention import (
    purge_audit,
    purge_messages,
    purge_outbox,
    purge_tickets,
)
from iqmaild.parse.message import participants
from iqmaild.storage.models import (
    Account,
    Address,
    AuditEvent,
    AuthToken,
    Message,
    OutboxItem,
    Share,
    Suppression,
    Ticket,
)

SCAN_PAGE = 50  # messages read per query while looking for an address (raw bytes)


def subject_address(value: str) -> str:
    address = normalize(value)
    if address is None:
        raise ValueError(f"{value!r} is not an email address")
    return address


@dataclass
class Found:
    """Every record about one address, as ids (and, for an export, the rows)."""

    address: str
    tickets: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    outbox: list[int] = field(default_factory=list)
    auth_tokens: list[int] = field(default_factory=list)
    audit_events: list[int] = field(default_factory=list)  # of its tickets
    audit_mentions: list[int] = field(default_factory=list)  # elsewhere, naming it
    suppressions: list[str] = field(default_factory=list)
    directory_addresses: list[int] = field(default_factory=list)
    directory_shares: list[int] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            "tickets": len(self.tickets),
            "messages": len(self.messages),
            "outbox": len(self.outbox),
            "auth_tokens": len(self.auth_tokens),
            "audit_events": len(self.audit_events) + len(self.audit_mentions),
            "suppressions": len(self.suppressions),
            "directory_addresses": len(self.directory_addresses),
            "directory_shares": len(self.directory_shares),
        }


def _may_name(raw: bytes, address: str) -> bool:
    """A cheap look before parsing: the address's domain is in the bytes (an IDNA
    domain may be written as U-labels there: always parsed)."""
    domain = address.rpartition("@")[2]
    if "xn--" in domain or not domain.isascii():
        return True
    return domain.encode() in raw.lower()


async def _scan_messages(session: AsyncSession, address: str) -> list[int]:
    """Messages naming the address in From/To/Cc as stored, or as envelope sender."""
    out: list[int] = []
    last = 0
    while True:
        rows = list(
            await session.execute(
                select(Message.id, Message.raw, Message.mail_from, Message.from_address)
                .where(Message.purged_at.is_(None), Message.id > last)
                .order_by(Message.id)
                .limit(SCAN_PAGE)
            )
        )
        for message_id, raw, mail_from, from_address in rows:
            if (
                from_address == address
                or normalize(mail_from or "") == address
                or (raw and _may_name(raw, address) and address in participants(raw))
            ):
                out.append(message_id)
        if len(rows) < SCAN_PAGE:
            return out
        last = rows[-1][0]


async def find(session: AsyncSession, address: str) -> Found:
    found = Found(address)
    lowered = func.lower
    found.tickets = list(
        await session.scalars(
            select(Ticket.id).where(lowered(Ticket.requester) == address).order_by(Ticket.id)
        )
    )
    tickets = found.tickets or [-1]
    named = await _scan_messages(session, address)
    on_tickets = await session.scalars(select(Message.id).where(Message.ticket_id.in_(tickets)))
    found.messages = sorted(set(named) | set(on_tickets))
    found.outbox = list(
        await session.scalars(
            select(OutboxItem.id)
            .where(
                or_(
                    lowered(OutboxItem.recipient) == address,
                    OutboxItem.ticket_id.in_(tickets),
                    # staff copies (and answers) of the messages naming it
                    OutboxItem.message_id.in_(found.messages or [-1]),
                )
            )
            .order_by(OutboxItem.id)
        )
    )
    found.auth_tokens = list(
        await session.scalars(
            select(AuthToken.id)
            .where(or_(lowered(AuthToken.email) == address, AuthToken.ticket_id.in_(tickets)))
            .order_by(AuthToken.id)
        )
    )
    found.audit_events = list(
        await session.scalars(
            select(AuditEvent.id).where(AuditEvent.ticket_id.in_(tickets)).order_by(AuditEvent.id)
        )
    )
    domain = address.rpartition("@")[2]
    candidates = await session.execute(
        select(AuditEvent.id, AuditEvent.data)
        .where(
            AuditEvent.ticket_id.not_in(tickets) | AuditEvent.ticket_id.is_(None),
            cast(AuditEvent.data, Text).ilike(f"%{_like(domain)}%", escape="\\"),
        )
        .order_by(AuditEvent.id)
    )
    found.audit_mentions = [i for i, data in candidates if mentions(data or {}, address)]
    found.suppressions = list(
        await session.scalars(select(Suppression.email).where(Suppression.email == address))
    )
    found.directory_addresses = list(
        await session.scalars(select(Address.id).where(Address.email == address))
    )
    found.directory_shares = list(
        await session.scalars(select(Share.id).where(Share.email == address))
    )
    return found


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


# -- export ------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _row(obj: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column in obj.__table__.columns:
        if column.key in skip:
            continue
        value = getattr(obj, column.key)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, bytes):
            continue
        out[column.key] = value
    return out


async def _rows(session: AsyncSession, model: Any, column: Any, ids: list[Any]) -> list[Any]:
    if not ids:
        return []
    return list(await session.scalars(select(model).where(column.in_(ids)).order_by(column)))


async def export(session: AsyncSession, address: str, out: Path, now: datetime) -> Found:
    """Write ``out/data.json``, ``out/messages/<id>.eml`` (as received) and
    ``out/outbox/<id>.eml`` (as sent); owner-only, since they hold personal data."""
    found = await find(session, address)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"{out} is not empty")
    messages = await _rows(session, Message, Message.id, found.messages)
    outbox = await _rows(session, OutboxItem, OutboxItem.id, found.outbox)
    ticket_ids = {m.ticket_id for m in messages if m.ticket_id} | set(found.tickets)
    ticket_ids |= {o.ticket_id for o in outbox if o.ticket_id}
    tickets = await _rows(session, Ticket, Ticket.id, sorted(ticket_ids))
    numbers = {t.id: t.number for t in tickets}
    addresses = await _rows(session, Address, Address.id, found.directory_addresses)
    shares = await _rows(session, Share, Share.id, found.directory_shares)
    primary_of = [a.account_id for a in addresses if a.role == "primary"]
    accounts = await _rows(session, Account, Account.id, primary_of)
    tokens = await _rows(session, AuthToken, AuthToken.id, found.auth_tokens)
    audits = await _rows(
        session, AuditEvent, AuditEvent.id, sorted(found.audit_events + found.audit_mentions)
    )
    suppressions = await _rows(session, Suppression, Suppression.email, found.suppressions)

    def files(kind: str, rows: list[Any], attribute: str) -> dict[int, str]:
        named: dict[int, str] = {}
        for row in rows:
            content = getattr(row, attribute)
            if not content:
                continue  # purged: only its record remains
            folder = out / kind
            folder.mkdir(mode=0o700, exist_ok=True)
            name = f"{kind}/{row.id}.eml"
            _write(out / name, content)
            named[row.id] = name
        return named

    received = files("messages", messages, "raw")
    sent = files("outbox", outbox, "content")
    data = {
        "address": address,
        "exported_at": now.isoformat(),
        "directory": {
            "accounts_where_primary": [_row(a, ("created_at",)) for a in accounts],
            "addresses": [_row(a) for a in addresses],
            "shares": [_row(s) for s in shares],
        },
        "tickets": [
            {**_row(t, ("code_nonce",)), "requested_by_address": t.id in found.tickets}
            for t in tickets
        ],
        "messages": [
            {
                **_row(m, ("claimed_by", "claimed_until")),
                "ticket": numbers.get(m.ticket_id or 0),
                "eml": received.get(m.id),
            }
            for m in messages
        ],
        "outbox": [
            {
                **_row(o, ("claimed_by", "claimed_until")),
                "ticket": numbers.get(o.ticket_id or 0),
                "eml": sent.get(o.id),
            }
            for o in outbox
        ],
        "authorization_links": [
            {**_row(t, ("token_hash",)), "ticket": numbers.get(t.ticket_id)} for t in tokens
        ],
        "audit_events": [_row(a) for a in audits],
        "suppressions": [_row(s) for s in suppressions],
    }
    _write(
        out / "data.json",
        json.dumps(data, ensure_ascii=False, indent=1, default=str).encode() + b"\n",
    )
    return found


def _write(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(content)


# -- erase -------------------------------------------------------------------------


async def erase(session: AsyncSession, address: str, now: datetime) -> Found:
    """Remove or anonymize every record about ``address``, in the caller's transaction."""
    found = await find(session, address)
    await purge_tickets(session, found.tickets, now)
    await purge_messages(session, found.messages, now)
    if found.outbox:
        # Mail to an erased address is not sent any more.
        await session.execute(
            update(OutboxItem)
            .where(
                OutboxItem.id.in_(found.outbox),
                OutboxItem.state.in_(("queued", "sending", "held")),
            )
            .values(state="failed", last_error="erased (data subject's request)")
        )
    await purge_outbox(session, found.outbox, now)
    if found.auth_tokens:
        await session.execute(delete(AuthToken).where(AuthToken.id.in_(found.auth_tokens)))
    await purge_audit(
        session, found.audit_events, now, clean=lambda d: erase_from(strip_personal(d), address)
    )
    # Events of other tickets keep what is not this address (retention takes the rest).
    await purge_audit(
        session, found.audit_mentions, now, clean=lambda d: erase_from(d, address), mark=False
    )
    if found.suppressions:
        await session.execute(delete(Suppression).where(Suppression.email == address))
    if found.directory_shares:
        await session.execute(delete(Share).where(Share.id.in_(found.directory_shares)))
    if found.directory_addresses:
        await session.execute(delete(Address).where(Address.id.in_(found.directory_addresses)))
    return found


def audit_event(event: str, actor: str, now: datetime, counts: dict[str, int]) -> AuditEvent:
    """Who did it and when, with the counts: never the address itself."""
    return AuditEvent(ts=now, event=event, actor=actor[:64], data={"counts": counts})
