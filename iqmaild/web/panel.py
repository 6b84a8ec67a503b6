"""The Customer Panel's ticket API over HTTP: tickets from the panel are authorized at once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from iqmaild.ingest.panel import PanelRequest
from iqmaild.storage.db import Database
from iqmaild.storage.directory import primary_of
from iqmaild.storage.models import Account, Service


class PanelTicket(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account_id: str = Field(min_length=1, max_length=64)
    service_id: str | None = Field(default=None, max_length=64)
    subject: str = Field(min_length=1, max_length=500)
    body: str = Field(max_length=200_000)


# Takes the request to the ticket it became: (number, full tag, authorization, message
# id), or None while it waits to be classified.
Submit = Callable[[PanelRequest], Awaitable[tuple[int | None, dict[str, Any]]]]


async def create_ticket(
    request: web.Request, db: Database, submit: Submit, log: Any
) -> web.Response:
    try:
        data = PanelTicket.model_validate_json(await request.read())
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
    panel = PanelRequest(
        account_id=account.id,
        service_id=data.service_id,
        subject=data.subject,
        body=data.body,
        contact=contact,
        peer=request.remote or "",
    )
    try:
        message_id, ticket = await submit(panel)
    except Exception as exc:
        log.error("panel.store_failed", error=type(exc).__name__)
        return web.json_response({"error": "temporarily unavailable"}, status=503)
    if not ticket:
        return web.json_response({"status": "queued", "message": message_id}, status=202)
    return web.json_response({**ticket, "message": message_id}, status=201)
