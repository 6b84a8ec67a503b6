"""The Customer Panel as an intake channel: a ticket the panel submits becomes a
message like any other (stored first, then classified), written by us.

The panel names the account (and perhaps a service); the message comes from
the account's primary address, so the acknowledgement with the code goes
there. Its Message-ID is not one of our signed ones: those mark our own mail
coming back.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from iqmaild.clock import Clock
from iqmaild.core.text import clean_text
from iqmaild.deliver import mime
from iqmaild.persist.store import Incoming


@dataclass(frozen=True)
class PanelRequest:
    account_id: str
    service_id: str | None
    subject: str
    body: str
    contact: str  # the account's primary address
    peer: str


def panel_message(request: PanelRequest, desk_address: str, domain: str, clock: Clock) -> Incoming:
    utf8 = not (request.contact + desk_address).isascii()
    fields = [
        mime.address("From", request.contact, utf8=utf8),
        mime.address("To", desk_address, utf8=utf8),
        mime.unstructured("Subject", clean_text(request.subject, 500), utf8=utf8),
        mime.date("Date", clock.now()),
        mime.msg_ids("Message-ID", (f"<panel.{secrets.token_hex(10)}@{domain}>",)),
    ]
    return Incoming(
        raw=mime.message(fields, request.body, None, utf8=utf8),
        mail_from=request.contact,
        rcpt_to=[],
        channel="panel",
        peer=request.peer,
        account_id=request.account_id,
        extra={"panel_service": request.service_id or ""},
    )
