"""Building outbound mail: customer mail from templates, staff deliveries.

Every header value is plain text we chose or cleaned; no header object from an
incoming message is ever copied (CVE-2024-6923). Ticket mail carries the tag
exactly once, threads on the customer's message and carries a signed
reference in its Message-ID.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from iqmaild.config import Config
from iqmaild.core import threadref
from iqmaild.core.tag import TagFormat
from iqmaild.ingest.parse import clean_text
from iqmaild.rendering import Renderer

# SMTP line endings; long ASCII ids fold at spaces, never into encoded words.
MAIL_POLICY = policy.SMTP.clone(max_line_length=998)
_SAFE_TOKEN = re.compile(r"[^A-Za-z0-9._+-]")
_XIQ = re.compile(rb"^x-iq-", re.IGNORECASE)


@dataclass(frozen=True)
class Composed:
    content: bytes
    message_id: str  # with angle brackets


@dataclass(frozen=True)
class ThreadInfo:
    """What a reply needs from the message it answers (already cleaned)."""

    message_id: str = ""
    references: tuple[str, ...] = ()
    thread_index: str | None = None


@dataclass(frozen=True)
class TicketRef:
    """What templates may show of a ticket; ``tag`` is full or short by recipient."""

    number: int
    tag: str
    subject: str


def _child_thread_index(parent: str) -> str | None:
    """Outlook's Thread-Index of a reply: the parent's bytes plus a 5-byte child block."""
    try:
        data = base64.b64decode(parent, validate=True)
    except ValueError:
        return None
    if len(data) < 22:
        return None
    delta = int(time.time() * 10_000_000) & 0xFF_FFFF_FFFF
    return base64.b64encode(data + delta.to_bytes(5, "big")).decode("ascii")


class Composer:
    def __init__(self, config: Config, renderer: Renderer, tags: TagFormat) -> None:
        self.config = config
        self.renderer = renderer
        self.tags = tags
        self.domain = config.message_id_domain
        # Parsed once: every outbound mail names it.
        self.desk_address = config.desk_address

    def new_message_id(self, ticket_number: int | None) -> str:
        unique = secrets.token_hex(8)
        return threadref.make_message_id(self.config.key, ticket_number, unique, self.domain)

    def customer_mail(
        self,
        *,
        template: str,
        lang: str,
        ticket: TicketRef,
        recipient: str,
        thread: ThreadInfo | None = None,
        automatic: bool = True,
        **ctx: Any,
    ) -> Composed:
        """A templated mail about a ticket to one customer address."""
        rendered = self.renderer.render_mail(
            lang,
            template,
            ticket=ticket,
            recipient=recipient,
            desk_address=self.desk_address,
            panel_url=self.config.notices.panel_url,
            **ctx,
        )
        msg = EmailMessage(policy=MAIL_POLICY)
        msg["From"] = self.config.outbound.from_
        msg["To"] = Address(addr_spec=recipient)
        msg["Subject"] = clean_text(f"Re: {ticket.tag} {rendered.subject}", 900)
        msg["Date"] = format_datetime(_now(), usegmt=True)
        message_id = self.new_message_id(ticket.number)
        msg["Message-ID"] = message_id
        self._thread_headers(msg, thread, ticket.subject)
        if automatic:
            msg["Auto-Submitted"] = "auto-replied"
            msg["X-Auto-Response-Suppress"] = "All"
        msg.set_content(rendered.text, charset="utf-8", cte="quoted-printable")
        if rendered.html is not None:
            msg.add_alternative(
                rendered.html, subtype="html", charset="utf-8", cte="quoted-printable"
            )
        return Composed(msg.as_bytes(policy=MAIL_POLICY), message_id)

    def _thread_headers(self, msg: EmailMessage, thread: ThreadInfo | None, topic: str) -> None:
        if thread is None:
            return
        refs = [r for r in thread.references if r][-20:]
        if thread.message_id:
            msg["In-Reply-To"] = f"<{thread.message_id}>"
            if thread.message_id not in refs:
                refs.append(thread.message_id)
        if refs:
            msg["References"] = " ".join(f"<{r}>" for r in refs[-20:])
        if thread.thread_index:
            child = _child_thread_index(thread.thread_index)
            if child:
                msg["Thread-Index"] = child
                msg["Thread-Topic"] = clean_text(topic, 200)

    @property
    def envelope_from(self) -> str:
        """Bounces of our mail come back to the desk, where they are parsed."""
        return self.desk_address

    def staff_delivery(self, raw: bytes, verdict_headers: dict[str, str]) -> bytes:
        """The customer's message as received, with our verdict headers on top.

        Every ``X-IQ-*`` header that came from outside is removed first, so a
        customer cannot forge a verdict.
        """
        head, sep, body = _split_head(raw)
        kept: list[bytes] = []
        dropping = True  # continuation lines before the first header belong to nothing
        for line in head.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t"):
                if not dropping:
                    kept.append(_wrap(line, header=True))
                continue
            dropping = bool(_XIQ.match(line))
            if not dropping:
                kept.append(_wrap(line, header=True))
        ours = b"".join(
            f"{name}: {_header_safe(value)}\r\n".encode("ascii", "replace")
            for name, value in verdict_headers.items()
        )
        if any(len(line) > SMTP_LINE_LIMIT for line in body.splitlines()):
            body = b"".join(_wrap(line, header=False) for line in body.splitlines(keepends=True))
        return ours + b"".join(kept) + sep + body


SMTP_LINE_LIMIT = 998


def _wrap(line: bytes, *, header: bool) -> bytes:
    """Lines over SMTP's 998 octets are split as Postfix does (headers at spaces)."""
    if len(line) <= SMTP_LINE_LIMIT:
        return line
    content = line.rstrip(b"\r\n")
    ending = line[len(content) :] or b"\r\n"
    pieces: list[bytes] = []
    while len(content) > SMTP_LINE_LIMIT:
        cut = content.rfind(b" ", 1, SMTP_LINE_LIMIT) if header else -1
        if cut <= 0:
            cut = SMTP_LINE_LIMIT - 1
        pieces.append(content[:cut])
        content = (b" " if header and not content[cut : cut + 1].isspace() else b"") + content[cut:]
    pieces.append(content)
    return b"\r\n".join(pieces) + ending


def _split_head(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(header section with its last line ending, blank line, body)."""
    found = [(i, sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) != -1]
    if not found:
        return raw, b"", b""
    index, sep = min(found)
    half = len(sep) // 2
    return raw[: index + half], sep[half:], raw[index + len(sep) :]


def _header_safe(value: str) -> str:
    return clean_text(value, 900).encode("ascii", "replace").decode("ascii")


def safe_token(value: str) -> str:
    return _SAFE_TOKEN.sub("_", value)[:64]


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
