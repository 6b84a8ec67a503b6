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
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from iqmaild.clock import Clock, SystemClock
from iqmaild.config import Config
from iqmaild.core import loopmark, threadref
from iqmaild.core.tag import TagFormat
from iqmaild.core.text import clean_text, message_ids
from iqmaild.core.vocabulary import MailKind
from iqmaild.deliver import mime
from iqmaild.rendering import RenderedMail, Renderer

# SMTP line endings; long ASCII ids fold at spaces, never into encoded words.
MAIL_POLICY = policy.SMTP.clone(max_line_length=998)
# RFC 6531: to a UTF-8 local part the headers are UTF-8 too (sent with SMTPUTF8).
MAIL_POLICY_UTF8 = policy.SMTPUTF8.clone(max_line_length=998)


def policy_for(*addresses: str) -> Any:
    return MAIL_POLICY if all(a.isascii() for a in addresses) else MAIL_POLICY_UTF8


def address_header(address: str) -> Any:
    """An address for a To/From header; a UTF-8 local part goes in as plain text."""
    return Address(addr_spec=address) if address.isascii() else address


_SAFE_TOKEN = re.compile(r"[^A-Za-z0-9._+-]")
_XIQ = re.compile(rb"^x-iq-", re.IGNORECASE)
_LONG_LINE = re.compile(rb"[^\r\n]{999}")  # a line over SMTP's 998 octets
# The customer's threading fields: a staff copy carries its own (see staff_delivery).
_THREAD_FIELDS = (b"message-id", b"in-reply-to", b"references")
# RFC 3834 automatic mail, and Exchange's "no out-of-office replies to this".
_AUTOMATIC_FIELDS = (
    mime.token("Auto-Submitted", "auto-replied"),
    mime.token("X-Auto-Response-Suppress", "All"),
)


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


def _display_name_and_address(from_: str, address: str) -> tuple[str, str]:
    """The display name of ``outbound.from`` (read once, at start) and its address."""
    header = policy.default.header_factory("from", from_)
    mailboxes = getattr(header, "addresses", ())
    name = mailboxes[0].display_name if mailboxes else ""
    return clean_text(name), address


def _mark(kind: MailKind | None, automatic: bool) -> str:
    """What kind of mail of ours a Message-ID names (its first character)."""
    if kind in (MailKind.NOTICE, MailKind.REFUSAL):
        return threadref.NOTICE
    return threadref.AUTOMATIC if automatic else threadref.PERSON


def _child_thread_index(parent: str, now: datetime) -> str | None:
    """Outlook's Thread-Index of a reply: the parent's bytes plus a 5-byte child block."""
    try:
        data = base64.b64decode(parent, validate=True)
    except ValueError:
        return None
    if len(data) < 22:
        return None
    delta = int(now.timestamp() * 10_000_000) & 0xFF_FFFF_FFFF
    return base64.b64encode(data + delta.to_bytes(5, "big")).decode("ascii")


class Composer:
    def __init__(
        self, config: Config, renderer: Renderer, tags: TagFormat, clock: Clock | None = None
    ) -> None:
        self.clock = clock or SystemClock()
        self.config = config
        self.renderer = renderer
        self.tags = tags
        self.domain = config.message_id_domain
        # Parsed once: every outbound mail names it.
        self.desk_address = config.desk_address
        self._from = _display_name_and_address(config.outbound.from_, self.desk_address)
        self._from_fields: dict[bool, mime.Field] = {}  # the From field, ASCII and UTF-8

    def new_message_id(self, ticket_number: int | None, kind: str = threadref.AUTOMATIC) -> str:
        """Ours, signed; its first character says what kind of mail it is (threadref)."""
        unique = kind + secrets.token_hex(8)
        return threadref.make_message_id(self.config.keys, ticket_number, unique, self.domain)

    def loop_mark(self) -> str:
        return loopmark.make_mark(self.config.keys, secrets.token_hex(8))

    def customer_mail(
        self,
        *,
        kind: MailKind,
        lang: str,
        ticket: TicketRef | None,
        recipient: str,
        thread: ThreadInfo | None = None,
        automatic: bool = True,
        **ctx: Any,
    ) -> Composed:
        """A templated mail to one customer address.

        ``ticket`` None: the mail must reveal nothing of any ticket (a refusal),
        so it carries no tag and its Message-ID names no ticket.
        """
        rendered = self.render(kind, lang, ticket, recipient, ctx)
        return self.write(rendered, ticket, recipient, thread, automatic, kind)

    def render(
        self,
        kind: MailKind,
        lang: str,
        ticket: TicketRef | None,
        recipient: str,
        ctx: dict[str, Any],
    ) -> RenderedMail:
        return self.renderer.render_mail(
            lang,
            kind.value,
            ticket=ticket,
            recipient=recipient,
            desk_address=self.desk_address,
            panel_url=self.config.notices.panel_url,
            **ctx,
        )

    def write(
        self,
        rendered: RenderedMail,
        ticket: TicketRef | None,
        recipient: str,
        thread: ThreadInfo | None,
        automatic: bool,
        kind: MailKind | None = None,
    ) -> Composed:
        """A rendered mail as bytes, written by `mime` without an `EmailMessage`.

        The same fields, in the same order, as the `EmailMessage` it replaces
        (`write_email_message`), MIME-Version always right before Content-Type.
        To a UTF-8 local part the headers are UTF-8 too (RFC 6531, sent with
        SMTPUTF8), as ``email.policy.SMTPUTF8`` writes them.
        """
        utf8 = not recipient.isascii()
        subject = f"Re: {ticket.tag} {rendered.subject}" if ticket else rendered.subject
        message_id = self.new_message_id(ticket.number if ticket else None, _mark(kind, automatic))
        fields = [
            self._from_field(utf8),
            mime.address("To", recipient, utf8=utf8),
            mime.unstructured("Subject", clean_text(subject, 900), utf8=utf8),
            mime.date("Date", self.clock.now()),
            mime.msg_ids("Message-ID", (message_id,)),
            mime.token(loopmark.HEADER, self.loop_mark()),
        ]
        if thread is not None:
            self._thread_fields(fields, thread, ticket.subject if ticket else "", utf8)
        if automatic:
            fields += _AUTOMATIC_FIELDS
        content = mime.message(fields, rendered.text, rendered.html, utf8=utf8)
        return Composed(content, message_id)

    def _from_field(self, utf8: bool) -> mime.Field:
        field = self._from_fields.get(utf8)
        if field is None:
            name, addr = self._from
            field = self._from_fields[utf8] = mime.address("From", addr, name, utf8=utf8)
        return field

    def _thread_fields(
        self, fields: list[mime.Field], thread: ThreadInfo, topic: str, utf8: bool
    ) -> None:
        # Ids are plain ASCII (the parser keeps no other); one that is not is dropped
        # here rather than written in a form a reader could take for something else.
        refs = [r for r in thread.references if r and mime.is_msg_id(f"<{r}>")][-20:]
        if thread.message_id and mime.is_msg_id(f"<{thread.message_id}>"):
            fields.append(mime.msg_ids("In-Reply-To", (f"<{thread.message_id}>",)))
            if thread.message_id not in refs:
                refs.append(thread.message_id)
        if refs:
            fields.append(mime.msg_ids("References", [f"<{r}>" for r in refs[-20:]]))
        if thread.thread_index:
            child = _child_thread_index(thread.thread_index, self.clock.now())
            if child:
                fields.append(mime.token("Thread-Index", child))
                topic = clean_text(topic, 200)
                if topic:  # no subject, no topic: an empty field says nothing
                    fields.append(mime.unstructured("Thread-Topic", topic, utf8=utf8))

    def write_email_message(
        self,
        rendered: RenderedMail,
        ticket: TicketRef | None,
        recipient: str,
        thread: ThreadInfo | None,
        automatic: bool,
        kind: MailKind | None = None,
    ) -> Composed:
        """The same mail built as an `EmailMessage`: how `customer_mail` worked
        before `write`. Not used by the daemon; kept as the reference that
        tests/deliver/test_mime.py compares `write` with and bench/compose.py
        measures it against."""
        mail_policy = policy_for(recipient)
        msg = EmailMessage(policy=mail_policy)
        msg["From"] = self.config.outbound.from_
        msg["To"] = address_header(recipient)
        subject = f"Re: {ticket.tag} {rendered.subject}" if ticket else rendered.subject
        msg["Subject"] = clean_text(subject, 900)
        msg["Date"] = format_datetime(self.clock.now(), usegmt=True)
        message_id = self.new_message_id(ticket.number if ticket else None, _mark(kind, automatic))
        msg["Message-ID"] = message_id
        msg[loopmark.HEADER] = self.loop_mark()
        self._thread_headers(msg, thread, ticket.subject if ticket else "")
        if automatic:
            msg["Auto-Submitted"] = "auto-replied"
            msg["X-Auto-Response-Suppress"] = "All"
        msg.set_content(rendered.text, charset="utf-8", cte="quoted-printable")
        if rendered.html is not None:
            msg.add_alternative(
                rendered.html, subtype="html", charset="utf-8", cte="quoted-printable"
            )
        return Composed(msg.as_bytes(policy=mail_policy), message_id)

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
            child = _child_thread_index(thread.thread_index, self.clock.now())
            if child:
                msg["Thread-Index"] = child
                msg["Thread-Topic"] = clean_text(topic, 200)

    def staff_delivery(
        self, raw: bytes, verdict_headers: dict[str, str], ticket_number: int | None = None
    ) -> Composed:
        """The customer's message as received, with our verdict headers on top.

        Every ``X-IQ-*`` header that came from outside is removed first, so a
        customer cannot forge a verdict. The copy gets a Message-ID of its own
        (signed, naming the ticket) and threads under the customer's message
        (In-Reply-To, References): the pending and the authorized copy of one
        message are two mails, and a client that drops a second mail with a
        Message-ID it already has would hide the authorized one.
        """
        head, sep, body = _split_head(raw)
        kept: list[bytes] = []
        threading: dict[bytes, list[bytes]] = {}  # the customer's ids, replaced by ours
        field: list[bytes] | None = None  # the lines of the field being read
        for line in head.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t"):
                # Continuation lines before the first header belong to nothing.
                if field is not None:
                    field.append(line)
                continue
            name = line.split(b":", 1)[0].strip().lower()
            if _XIQ.match(line):
                field = []  # dropped
            elif name in _THREAD_FIELDS:
                field = threading.setdefault(name, [])
                field.append(line)
            else:
                field = kept
                kept.append(line)
        message_id = self.new_message_id(ticket_number, threadref.STAFF)
        parent = _ids(threading.get(b"message-id"))[:1]  # the customer's own id
        refs = [*_ids(threading.get(b"references")), *_ids(threading.get(b"in-reply-to"))]
        thread = [mime.msg_ids("Message-ID", (message_id,))]
        if parent:
            thread.append(mime.msg_ids("In-Reply-To", (f"<{parent[0]}>",)))
        refs = list(dict.fromkeys([r for r in refs if r not in parent] + parent))[-20:]
        if refs:
            thread.append(mime.msg_ids("References", [f"<{r}>" for r in refs]))
        ours = b"".join(
            f"{name}: {_header_safe(value)}\r\n".encode("ascii", "replace")
            for name, value in {**verdict_headers, loopmark.HEADER: self.loop_mark()}.items()
        ) + "".join(thread).encode("ascii")
        kept = [_wrap(line, header=True) for line in kept]
        if _LONG_LINE.search(body):
            body = b"".join(_wrap(line, header=False) for line in body.splitlines(keepends=True))
        return Composed(ours + b"".join(kept) + sep + body, message_id)

    def staff_summary(self, staff_copy: bytes, preview: int = 20_000) -> bytes:
        """A staff copy the relay refused as too large, without its attachments.

        Our verdict headers and the customer's identifying headers stay; the
        body says how large the original was and where to read it whole.
        """
        head, _, body = _split_head(staff_copy)
        keep = ("x-iq-", "from:", "to:", "cc:", "subject:", "date:", "message-id:")
        keep += ("in-reply-to:", "references:")
        kept: list[bytes] = []
        keeping = False
        for line in head.splitlines(keepends=True):
            if line[:1] in (b" ", b"\t"):
                if keeping:
                    kept.append(line)
                continue
            keeping = line.lower().startswith(tuple(k.encode() for k in keep))
            if keeping:
                kept.append(line)
        number = next(
            (
                line.split(b":", 1)[1].strip().decode("ascii", "replace")
                for line in kept
                if line.lower().startswith(b"x-iq-message:")
            ),
            "?",
        )
        text = body[:preview].decode("utf-8", "replace")
        note = (
            f"The original message ({len(staff_copy)} bytes) was too large for the relay.\n"
            f"Read it whole with: iqmaild message show {number} --raw\n\n"
            f"The first {preview} bytes of its body, undecoded:\n\n{text}\n"
        )
        ours = (
            f"X-IQ-Summary: original of {len(staff_copy)} bytes refused as too large\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
        ).encode()
        wrapped = b"".join(
            _wrap(line, header=False)
            for line in note.replace("\r\n", "\n").replace("\n", "\r\n").encode().splitlines(True)
        )
        return ours + b"".join(kept) + b"\r\n" + wrapped


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


def _ids(lines: list[bytes] | None) -> list[str]:
    """The message ids of one field's lines (its name included), in order."""
    if not lines:
        return []
    value = b"".join(lines).split(b":", 1)[-1]
    return message_ids(value.decode("ascii", "replace"))


def _header_safe(value: str) -> str:
    return clean_text(value, 900).encode("ascii", "replace").decode("ascii")


def safe_token(value: str) -> str:
    return _SAFE_TOKEN.sub("_", value)[:64]
