"""The Customer Panel's ticket API: tickets from the panel are authorized at once."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from email.utils import format_datetime

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iqmaild.apply.desk import Desk
from iqmaild.core.text import clean_text
from iqmaild.deliver.compose import address_header, policy_for
from iqmaild.persist.store import Incoming
from iqmaild.storage.db import Database
from iqmaild.storage.directory import primary_of
from iqmaild.storage.models import Account, Message, Service, Ticket, utcnow


class PanelTicket(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: str = Field(min_length=1, max_length=64)
    service_id: str | None = Field(default=None, max_length=64)
    subject: str = Field(min_length=1, max_length=500)
    body: str = Field(max_length=200_000)


async def create_ticket(
    request: web.Request,
    db: Database,
    desk: Desk,
    intake: Callable[[Incoming], Awaitable[int]],
) -> web.Response:
    try:
        body = await request.read()
        data = PanelTicket.model_validate_json(body)
    except ValidationError as exc:
        detail = exc.errors()[0]["msg"][:200]
        return web.json_response({"error": "invalid request", "detail": detail}, status=422)
    except (ValueError, RecursionError, web.HTTPException):
        return web.json_response({"error": "invalid request", "detail": "invalid JSON"}, status=422)
    async with db.read() as session:
        account = await session.get(Account, data.account_id)
        if account is None:
            return web.json_response({"error": "unknown account"}, status=404)
        if data.service_id is not None:
            service = await session.get(Service, data.service_id)
            if service is None or service.account_id != account.id:
                return web.json_response({"error": "unknown service"}, status=404)
        contact = await primary_of(session, account.id)
    if contact is None:
        return web.json_response({"error": "account has no primary address"}, status=409)

    desk_address = desk.config.smtp.desk_addresses[0]
    mail_policy = policy_for(contact, desk_address)
    msg = EmailMessage(policy=mail_policy)
    msg["From"] = address_header(contact)
    msg["To"] = address_header(desk_address)
    msg["Subject"] = clean_text(data.subject, 500)
    msg["Date"] = format_datetime(utcnow(), usegmt=True)
    # Not one of our signed ids: those mark our own mail coming back (a loop).
    msg["Message-ID"] = f"<panel.{secrets.token_hex(10)}@{desk.composer.domain}>"
    msg.set_content(data.body, charset="utf-8", cte="quoted-printable")
    item = Incoming(
        raw=msg.as_bytes(policy=mail_policy),
        mail_from=contact,
        rcpt_to=[],
        channel="panel",
        peer=request.remote or "",
        account_id=account.id,
        extra={"panel_service": data.service_id or ""},
    )
    try:
        message_id = await intake(item)
    except Exception as exc:
        desk.log.error("panel.store_failed", error=type(exc).__name__)
        return web.json_response({"error": "temporarily unavailable"}, status=503)
    async with db.read() as session:
        stored = await session.get(Message, message_id)
        ticket = (
            await session.get(Ticket, stored.ticket_id) if stored and stored.ticket_id else None
        )
    if ticket is None:
        return web.json_response({"status": "queued", "message": message_id}, status=202)
    from iqmaild.apply.tickets import tag_for

    return web.json_response(
        {
            "number": ticket.number,
            "tag": tag_for(desk.tags, desk.key, ticket, True),
            "authorization": ticket.authorization,
            "message": message_id,
        },
        status=201,
    )
