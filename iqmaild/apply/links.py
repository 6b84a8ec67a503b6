"""Authorization links: what the page shows, and confirming one as one atomic change.

The token row is claimed with a conditional UPDATE (unused and unexpired), so
double clicks and several instances confirm at most once. Confirming
authorizes the ticket: its pending messages reach staff again as authorized,
its other links are spent, and the owner gets the acknowledgement, the first
mail that carries the code, threaded under their own message.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update

from iqmaild.apply.effects import Applier, Writes, audit_row, token_hash
from iqmaild.clock import Clock
from iqmaild.core.mail import Acknowledgement, MailIntent, StaffCopy
from iqmaild.core.vocabulary import MailKind
from iqmaild.deliver.compose import ThreadInfo
from iqmaild.metrics import Metrics
from iqmaild.parse.message import body_preview, thread_of
from iqmaild.storage.db import Database
from iqmaild.storage.directory import view_for
from iqmaild.storage.models import Account, AuditEvent, AuthToken, Message, Service, Ticket

PREVIEW_LINES = 6


class LinkState(StrEnum):
    VALID = "valid"
    NOT_FOUND = "not_found"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"  # the address lost the right to act on the ticket


@dataclass(frozen=True)
class LinkInfo:
    """What the page may show: the owner sees what a spoofed request would make them
    authorize (account, service, the first lines of the message)."""

    state: LinkState
    ticket_number: int | None = None
    subject: str = ""
    sender: str = ""
    lang: str = "pl"
    account: str = ""
    service: str = ""
    preview: str = ""
    authorized: bool = False  # the ticket is (already) authorized: a used link's page says so


def _plausible(token: str) -> bool:
    return 20 <= len(token) <= 100 and all(c.isalnum() or c in "-_" for c in token)


class Links:
    def __init__(
        self, db: Database, clock: Clock, applier: Applier, log: Any, metrics: Metrics
    ) -> None:
        self.db = db
        self.clock = clock
        self.applier = applier
        self.log = log
        self.metrics = metrics

    async def inspect(self, token: str) -> LinkInfo:
        """What the GET page shows; changes nothing (scanners pre-fetch links)."""
        if not _plausible(token):
            return LinkInfo(LinkState.NOT_FOUND)
        async with self.db.read() as session:
            row = await session.scalar(
                select(AuthToken).where(AuthToken.token_hash == token_hash(token))
            )
            if row is None:
                return LinkInfo(LinkState.NOT_FOUND)
            ticket = await session.get(Ticket, row.ticket_id)
            info = await self._describe(session, row, ticket)
            if row.used_at is not None:
                return _with(info, LinkState.USED)
            if row.expires_at <= self.clock.now():
                return _with(info, LinkState.EXPIRED)
            if ticket is None or not await _still_eligible(session, row.email, ticket):
                return _with(info, LinkState.REVOKED)
            return info

    async def _describe(self, session: Any, row: AuthToken, ticket: Ticket | None) -> LinkInfo:
        if ticket is None:
            return LinkInfo(LinkState.VALID, sender=row.email)
        account = await session.get(Account, ticket.account_id) if ticket.account_id else None
        service = await session.get(Service, ticket.service_id) if ticket.service_id else None
        message = await session.get(Message, row.message_id) if row.message_id else None
        preview = ""
        if message is not None:
            lines = [line.rstrip() for line in body_preview(message.raw, 2000).splitlines()]
            preview = "\n".join(line for line in lines if line.strip())
            preview = "\n".join(preview.splitlines()[:PREVIEW_LINES])[:600]
        return LinkInfo(
            LinkState.VALID,
            ticket_number=ticket.number,
            subject=ticket.subject,
            sender=row.email,
            lang=ticket.lang,
            account=(account.name or account.id) if account else "",
            service=(service.name or service.id) if service else "",
            preview=preview,
            authorized=ticket.authorization == "authorized",
        )

    async def confirm(self, token: str) -> LinkInfo:
        """Authorize the ticket behind the token, once."""
        info = await self.inspect(token)
        if info.state is not LinkState.VALID:
            return info
        now = self.clock.now()
        async with self.db.transaction() as session:
            result = await session.execute(
                update(AuthToken)
                .where(
                    AuthToken.token_hash == token_hash(token),
                    AuthToken.used_at.is_(None),
                    AuthToken.expires_at > now,
                )
                .values(used_at=now)
                .returning(AuthToken.ticket_id, AuthToken.email, AuthToken.message_id)
            )
            claimed = result.first()
            if claimed is None:
                return _with(info, LinkState.USED)
            ticket = await session.get(Ticket, claimed.ticket_id, with_for_update=True)
            if ticket is None:
                return LinkInfo(LinkState.NOT_FOUND)
            if not await _still_eligible(session, claimed.email, ticket):
                # The share was revoked or the primary address changed since the link
                # went out: the token is spent and nothing is authorized.
                session.add(
                    AuditEvent(
                        **audit_row(
                            "authlink.refused",
                            now,
                            ticket_id=ticket.id,
                            actor="link",
                            email=claimed.email,
                            why="not_eligible",
                        )
                    )
                )
                authorized = False
            else:
                await self._authorize(session, ticket, claimed.email, claimed.message_id)
                authorized = True
        if not authorized:
            self.log.info("authlink.refused", ticket=info.ticket_number, why="not_eligible")
            return _with(info, LinkState.REVOKED)
        self.log.info("authlink.confirmed", ticket=ticket.number)
        self.metrics.inc("authlinks_confirmed_total")
        return replace(info, authorized=True)

    async def _authorize(
        self, session: Any, ticket: Ticket, email: str, message_id: int | None
    ) -> None:
        """Inside the claiming transaction: authorize, re-deliver, spend, acknowledge."""
        now = self.clock.now()
        was = ticket.authorization
        ticket.authorization = "authorized"
        ticket.updated_at = now
        writes = Writes()
        pending = list(
            await session.scalars(
                select(Message).where(Message.ticket_id == ticket.id, Message.decision == "pending")
            )
        )
        for message in pending:
            message.decision = "authorized"
            writes.outbox.append(
                self.applier.staff_row(
                    raw=message.raw,
                    message_id=message.id,
                    rcpt_to=list(message.rcpt_to or []),
                    account_id=message.account_id,
                    ticket=ticket,
                    context=StaffCopy("authorized", (), message.sender_role),
                    now=now,
                )
            )
        await session.execute(
            update(AuthToken)
            .where(AuthToken.ticket_id == ticket.id, AuthToken.used_at.is_(None))
            .values(used_at=now)
        )
        writes.audits.append(
            audit_row(
                "authlink.confirmed",
                now,
                ticket_id=ticket.id,
                actor="link",
                email=email,
                was=was,
                messages=len(pending),
            )
        )
        origin = next((m for m in pending if m.id == message_id), None)
        if origin is None and message_id:
            origin = await session.get(Message, message_id)
        thread = ThreadInfo(*thread_of(origin.raw)) if origin is not None else None
        # The owner's own click: no rate limit may withhold the code from them.
        intent = MailIntent(MailKind.ACKNOWLEDGEMENT, email, True, Acknowledgement("link"))
        self.applier.queue_customer(
            writes, intent, ticket, thread, origin.id if origin else None, ticket.lang, now
        )
        await session.flush()
        await self.applier.write(session, writes)


def _with(info: LinkInfo, state: LinkState) -> LinkInfo:
    """A link that no longer works names its ticket and nothing the customer wrote:
    whoever holds a spent copy (a forward, an auto-reply) learns no subject, no sender."""
    return LinkInfo(
        state, ticket_number=info.ticket_number, lang=info.lang, authorized=info.authorized
    )


async def _still_eligible(session: Any, email: str, ticket: Ticket) -> bool:
    """The address may still act on the ticket's account and service."""
    if ticket.account_id is None:
        return False
    directory = await view_for(session, [email])
    return directory.may_act(email, ticket.account_id, ticket.service_id, ticket.requester)
