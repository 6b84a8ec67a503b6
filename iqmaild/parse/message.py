"""Raw bytes to `MessageFacts`: the parser side of classification.

Header fields come from our own split of the header section (`headers.Fields`),
MIME structure from ``email.policy.default`` (never ``parseaddr``/
``getaddresses``, which misparse crafted addresses, CVE-2023-27043). Every
access is fallible: bad input becomes defects and facts, never an exception,
and a recipient that cannot be read whole counts against the sender.

The rules read headers only, so the MIME tree is built only where something
needs it (a delivery report, a base64 text part that may quote our link, raw
8-bit headers to be read in a declared charset): most mail is classified from
the header section alone.
"""

from __future__ import annotations

import binascii
import codecs
import email
import html
import itertools
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import Any

from iqmaild.core import loopmark, threadref, verp
from iqmaild.core.addresses import domain_of, normalize
from iqmaild.core.facts import MessageFacts
from iqmaild.core.keys import KeyRing
from iqmaild.core.tag import TagFormat
from iqmaild.core.text import SURROGATES, clean_text, message_ids
from iqmaild.core.vocabulary import Channel
from iqmaild.parse.authres import dmarc_failed
from iqmaild.parse.dsn import DeliveryReport, read_report
from iqmaild.parse.headers import (
    HEADER_PARSE_LIMIT,
    PARSE_BUDGET,
    Fields,
    as_text,
    parse_header,
    too_long,
    unfold,
)

_THREAD_INDEX = re.compile(r"^[A-Za-z0-9+/=]{1,400}$")
STORED_HEADERS = ("from", "to", "cc", "reply-to", "sender", "subject", "date", "message-id")
MAX_RECIPIENTS = 5000
_TOKEN = r"([A-Za-z0-9_-]{20,100})"


def _utf8(text: str) -> str | None:
    """Raw 8-bit from the wire read as UTF-8 (RFC 6532 addresses); None when it is not.

    Strict decoding never yields ASCII from bytes >= 0x80, so this cannot turn
    anything into the address of a directory entry written in ASCII.
    """
    if not SURROGATES.search(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return None


@dataclass(frozen=True)
class ParseContext:
    """What parsing needs from the configuration, built once at wiring."""

    tags: TagFormat
    key: KeyRing | bytes
    msgid_domain: str
    trusted_authserv_ids: frozenset[str] = frozenset()
    wanted_headers: frozenset[str] = frozenset()  # headers a rule reads (admin markers)
    return_path: str = ""  # base of our signed envelope senders ("" = none)
    delimiter: str = "+"
    link_prefix: str = ""  # public URL of authorization links, up to the token


@dataclass(frozen=True)
class ParsedMail:
    facts: MessageFacts
    message_id: str  # without angle brackets; "" when absent or unusable
    references: tuple[str, ...]  # message ids, oldest first
    thread_index: str | None  # Outlook's Thread-Index, when well-formed
    subject: str
    headers: dict[str, str] = field(default_factory=dict)
    defects: tuple[str, ...] = ()
    link_tokens: tuple[str, ...] = ()  # our authorization links found in the message
    report: DeliveryReport | None = None  # a delivery status notification's verdicts


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return ""


def _first(fields: Fields, name: str) -> str:
    value = fields.first(name)
    return clean_text(_safe_str(value)) if value is not None else ""


def _word(fields: Fields, name: str) -> str:
    """A header of ids or tokens (Message-ID, References, Auto-Submitted), as text."""
    return clean_text(fields.text(name))


class _Tree:
    """The MIME tree, built on first use and at most once.

    The stdlib cannot build every tree (``charset*=utf-16''x`` raises while the
    parameter is decoded, 3,000 nested parts raise RecursionError); then the tree
    is the legacy API's (or an empty message) and the failure a defect; every fact from
    the header section or the envelope stands: a report to our signed return
    address stays a report, whatever it quotes.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._msg: EmailMessage | None = None
        self.error: str | None = None

    @property
    def msg(self) -> EmailMessage:
        if self._msg is None:
            try:
                self._msg = email.message_from_bytes(self.raw, policy=policy.default)  # type: ignore[assignment]
            except Exception as exc:
                self.error = f"ParseFailure:{type(exc).__name__}"
                try:  # the legacy API parses parameters without decoding them
                    self._msg = email.message_from_bytes(self.raw)  # type: ignore[assignment]
                except Exception:
                    self._msg = EmailMessage()
        return self._msg  # type: ignore[return-value]

    @property
    def built(self) -> bool:
        return self._msg is not None


def _charsets(msg: EmailMessage) -> list[str]:
    """Where raw 8-bit header bytes are not UTF-8: the charsets to read them in.

    Old clients (Outlook Express) send unencoded ISO-8859-2/windows-1250 headers;
    the charset they declare for the text is the best guess, windows-1250 the last.
    """
    out: list[str] = []
    parts: list[Any] = [msg]
    try:
        if msg.is_multipart():
            parts.extend(itertools.islice(msg.iter_parts(), 20))
    except Exception:
        pass
    for part in parts:
        try:
            name = codecs.lookup(part.get_content_charset() or "ascii").name
        except Exception:
            continue
        if name != "ascii" and not name.startswith("utf") and name not in out:
            out.append(name)
    return [*out, "cp1250"] if "cp1250" not in out else out


def _display(fields: Fields, name: str, tree: _Tree) -> str:
    """Header text for people: like `_first`, but raw 8-bit read in ``charsets``.

    For display only (Subject, names); addresses always come from `_mailboxes`.
    """
    value = _first(fields, name)
    if "\ufffd" not in value:
        return value
    try:
        raw = fields.raw(name)[0][:HEADER_PARSE_LIMIT]
        data = raw.encode("ascii", "surrogateescape")
        data.decode("utf-8")
        return value  # valid UTF-8: the replacement characters were sent as such
    except UnicodeDecodeError:
        pass
    except Exception:
        return value
    for charset in _charsets(tree.msg):
        try:
            text = data.decode(charset)
            return clean_text(_safe_str(parse_header(name, text)))
        except Exception:
            continue
    return value


# Decoding trouble in a display name is not a malformed address; RFC 6531 local
# parts are legal (the email package still reports them as a defect).
_COSMETIC_DEFECTS = frozenset(
    {"UndecodableBytesDefect", "CharsetError", "NonPrintableDefect", "NonASCIILocalPartDefect"}
)
# In recipient lists, obsolete syntax (empty list elements, routes) loses no address.
_COSMETIC_IN_LISTS = _COSMETIC_DEFECTS | {"ObsoleteHeaderDefect"}


def _mailboxes(
    header: Any, cosmetic: frozenset[str] = _COSMETIC_DEFECTS
) -> tuple[list[str], list[str], bool]:
    """Normalized addresses of an address header, the entries that are not
    addresses (as cleaned text), and whether the header is malformed."""
    defects = getattr(header, "defects", None) or ()
    defective = any(type(d).__name__ not in cosmetic for d in defects)
    out: list[str] = []
    bad: list[str] = []
    try:
        addresses = header.addresses
    except Exception:
        return out, bad, True
    for address in addresses:
        try:
            spec = _utf8(address.addr_spec)
        except Exception:
            spec = None
        norm = normalize(spec) if spec and address.username and address.domain else None
        if norm is None:
            bad.append(clean_text(_safe_str(spec or address), 120) or "(empty address)")
            continue
        out.append(norm)
    return out, bad, defective


def _from_addresses(fields: Fields) -> tuple[tuple[str, ...], bool]:
    raws = fields.raw("from")
    if any(too_long(raw) for raw in raws):
        return (), True  # never decide identity on a From cut short
    if len(raws) != 1:
        return (), True  # several From fields: not one identity (and none parsed)
    headers = fields.parsed("from")
    if len(headers) != 1:
        return (), True
    found, bad, defective = _mailboxes(headers[0])
    return tuple(found), defective or bool(bad) or len(found) != 1


def _recipients(fields: Fields) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """To + Cc addresses, and what could not be read of them (fail closed)."""
    out: list[str] = []
    unreadable: list[str] = []
    if fields.truncated:
        unreadable.append("(more header fields than could be read)")
    for name in ("to", "cc"):
        for raw, header in fields.each(name):
            if too_long(raw):
                unreadable.append(f"({name} list longer than {HEADER_PARSE_LIMIT} characters)")
            if header is None:
                unreadable.append(f"(unreadable {name}: {clean_text(raw, 80)})")
                continue
            found, bad, defective = _mailboxes(header, _COSMETIC_IN_LISTS)
            if defective:
                unreadable.append(f"(malformed {name}: {clean_text(raw, 80)})")
            unreadable.extend(bad)
            out.extend(found)
            if len(out) > MAX_RECIPIENTS:
                unreadable.append(f"(more than {MAX_RECIPIENTS} recipients)")
                return tuple(out[:MAX_RECIPIENTS]), tuple(unreadable[:20])
    return tuple(out), tuple(dict.fromkeys(unreadable[:20]))


def _report_type(msg: EmailMessage) -> str | None:
    try:
        if msg.get_content_type() != "multipart/report":
            return None
        return str(msg.get_param("report-type", "") or "").lower()
    except Exception:
        return None


def _embedded_headers(msg: EmailMessage) -> str:
    """The returned message's headers inside a delivery report, as text."""
    try:
        for part in msg.walk():
            ctype = part.get_content_type()
            if ctype == "text/rfc822-headers":
                payload = part.get_payload(decode=True) or b""
                return payload.decode("utf-8", "replace")[:20000]
            if ctype == "message/rfc822":
                inner = part.get_payload()
                if isinstance(inner, list) and inner:
                    out, budget = [], PARSE_BUDGET  # a forged report must not cost more
                    for k, v in itertools.islice(inner[0].raw_items(), 100):
                        if k.lower() in ("to", "cc", "bcc"):
                            continue
                        value = v[: min(budget, 8000)]  # 2,000 characters are kept of each
                        budget -= len(value)
                        out.append(f"{k}: {as_text(parse_header(k.lower(), value), 2000)}\n")
                        if budget <= 0:
                            break
                    return "".join(out)
    except Exception:
        return ""
    return ""


_CODED = ("base64", "quoted-printable")


def _payloads(part: Any) -> list[bytes]:
    """A part's content as the email package decodes it and, where its
    Content-Transfer-Encoding is written so that the package does not decode it
    (folded, with a comment) though its header parser and a client read one,
    decoded by that too; a message/rfc822 part encoded against RFC 2046 decoded."""
    header = part.get("content-transfer-encoding")
    cte = getattr(header, "cte", "")
    if part.is_multipart():
        # message/rfc822 must not be encoded (RFC 2046 5.2.1); one that is, the
        # email package parses as if it were not: its "message" is the encoded text
        inner = part.get_payload()
        if part.get_content_maintype() != "message" or not inner or cte not in _CODED:
            return []
        data: Any = inner[0].as_bytes()
        return [binascii.a2b_qp(data) if cte == "quoted-printable" else _b64(data)]
    payload = part.get_payload(decode=True)
    out = [payload] if isinstance(payload, bytes) else []
    data = part.get_payload(decode=False)
    if cte in _CODED and str(header).lower() != cte and data:
        raw = str(data).encode("ascii", "surrogateescape")
        out.append(binascii.a2b_qp(raw) if cte == "quoted-printable" else _b64(raw))
    return out


def _b64(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data + b"==")  # lenient, as the email package is
    except (binascii.Error, ValueError):
        return b""


def _texts(msg: EmailMessage, budget: int = 2 * 1024 * 1024) -> list[str]:
    """Decoded content of the message's parts (nested messages too), bounded: text
    in its declared charset (UTF-16 hides nothing from a client) and as UTF-8,
    attachments as their bytes (a returned mail attached as a file is a copy too)."""
    out: list[str] = []
    try:
        for part in itertools.islice(msg.walk(), 200):
            try:
                payloads = _payloads(part)
            except Exception:
                continue
            for payload in payloads:
                data = payload[:budget]
                if part.get_content_maintype() == "text":
                    out.append(data.decode("utf-8", "replace"))
                    try:
                        charset = codecs.lookup(part.get_content_charset() or "utf-8").name
                    except LookupError:
                        charset = "utf-8"
                    if charset != "utf-8":
                        out.append(data.decode(charset, "replace"))
                else:
                    out.append(data.decode("latin-1"))
                budget -= len(payload)
            if budget <= 0:
                break
    except Exception:
        pass
    return out


# Charsets in which a link is not ASCII: only a decoder reads it.
_CHARSET = re.compile(rb"(?i)charset\*|charset[ \t]*=[ \t]*\"?(?:utf-?(?:7|16|32)|ucs|unicode)")
# Every Content-Transfer-Encoding value, however written (folded, a comment, an
# encoded word, after a bare CR); the plain ones the raw and QP scans cover.
_CTE = re.compile(rb"(?i)content-transfer-encoding[ \t]*:[ \t\r\n]*([^\r\n;]{0,40})")
_PLAIN_CTE = frozenset({b"7bit", b"8bit", b"binary", b"quoted-printable", b""})


def _needs_decoding(head: bytes) -> bool:
    if _CHARSET.search(head) is not None:
        return True
    return any(m.strip().strip(b'"').lower() not in _PLAIN_CTE for m in _CTE.findall(head))


_SOFT_BREAK = re.compile(rb"=[ \t]*\r?\n")
MAX_LINK_TOKENS = 500  # text a forger wrote (a Subject we quote) must not crowd ours out
TOKEN_LENGTH = 43  # secrets.token_urlsafe(32)
READING_BUDGET = 256 * 1024  # characters around our path decoded as a browser would


def _readings(text: str, mark: re.Pattern[str]) -> Iterator[str]:
    """``text`` and what a browser makes of it: HTML entities, percent escapes (a
    link a scanner rewrote: ``safelinks...?url=https%3A%2F%2F...``), one at a time;
    those only around the places that name our links' path (``mark``), and at
    most `READING_BUDGET` characters of them, so hostile text costs no more."""
    yield text
    for window in _windows(text, mark):
        unescaped = html.unescape(window) if "&" in window else window
        if unescaped is not window:
            yield unescaped
        if "%" in window:
            yield urllib.parse.unquote(window)
            if unescaped is not window:
                yield urllib.parse.unquote(unescaped)


def _windows(text: str, mark: re.Pattern[str]) -> list[str]:
    spans: list[list[int]] = []
    total = 0
    for match in mark.finditer(text):
        start, end = max(0, match.start() - 512), match.end() + 512
        if spans and start <= spans[-1][1]:
            total += end - spans[-1][1]
            spans[-1][1] = end
        else:
            total += end - start
            spans.append([start, end])
        if total > READING_BUDGET:
            break
    return [text[start:end] for start, end in spans]


def _link_tokens(raw: bytes, tree: _Tree, prefix: str, subject: str = "") -> tuple[str, ...]:
    """Tokens of our authorization links anywhere in the message (a returned link
    mail, a quote, a forward) in every form a person could open them: the raw
    text, quoted-printable decoded, every part decoded when anything needs a
    decoder, HTML entities and percent escapes undone, scheme and host in any
    case. A copy in any of them now sits in our database and the staff mailbox."""
    if not prefix:
        return ()
    pattern = re.compile("(?i:" + re.escape(prefix) + ")" + _TOKEN)
    mark = re.compile(re.escape(prefix.rstrip("/").rsplit("/", 1)[-1]), re.IGNORECASE)
    head = raw[: 4 * 1024 * 1024]

    def texts() -> Iterator[str]:  # one decoded copy of a 4 MB message at a time
        yield head.decode("ascii", "replace")
        yield subject
        if b"=" in head:
            yield binascii.a2b_qp(_SOFT_BREAK.sub(b"", head)).decode("ascii", "replace")
        if _needs_decoding(head):
            yield from _texts(tree.msg)

    found: dict[str, None] = {}
    for text in texts():
        for reading in _readings(text, mark):
            for token in pattern.findall(reading):
                found.setdefault(token, None)
                found.setdefault(token[:TOKEN_LENGTH], None)  # a token run on into text
    return tuple(itertools.islice(found, MAX_LINK_TOKENS))


def _own_mail(fields: Fields, key: KeyRing | bytes, domain: str, message_id: str) -> bool:
    """Our signed loop mark or one of our own Message-IDs: our mail came back."""
    if any(loopmark.is_ours(key, " ".join(raw.split())) for raw in fields.raw("x-iq-loop")):
        return True
    return bool(message_id) and threadref.is_ours(key, domain, f"<{message_id}>")


def _returned_row(rcpt_to: list[str], ctx: ParseContext) -> int | None:
    if not ctx.return_path:
        return None
    for address in rcpt_to:
        norm = normalize(address)
        if norm is not None:
            row = verp.returned_row(ctx.key, norm, ctx.return_path, ctx.delimiter)
            if row is not None:
                return row
    return None


def parse_message(
    raw: bytes,
    *,
    mail_from: str,
    ctx: ParseContext,
    rcpt_to: list[str] | None = None,
    channel: Channel = Channel.SMTP,
) -> ParsedMail:
    """Everything classification and threading need from one raw message."""
    fields = Fields.of(raw)
    tree = _Tree(raw)
    from_addresses, from_defect = _from_addresses(fields)
    subject = _display(fields, "subject", tree)
    in_reply_to = _word(fields, "in-reply-to")
    references_text = " ".join(clean_text(_safe_str(v)) for v in _words(fields, "references"))
    references = tuple(message_ids(references_text))[-50:]
    ids = message_ids(_word(fields, "message-id"))
    report = _report_type(tree.msg) if _may_be_report(fields) else None
    tag = ctx.tags.find(subject)
    key, domain = ctx.key, ctx.msgid_domain
    thread_ticket = threadref.find_ticket_reference(key, domain, in_reply_to, references_text)
    if report is not None and (tag is None and thread_ticket is None):
        embedded = _embedded_headers(tree.msg)
        thread_ticket = threadref.find_ticket_reference(key, domain, embedded)
        tag = ctx.tags.find(clean_text(embedded, 20000))
    auto_submitted = _word(fields, "auto-submitted").split(";", 1)[0].strip().lower() or None
    precedence = _word(fields, "precedence").lower() or None
    if precedence == "auto_reply" and auto_submitted is None:
        auto_submitted = "auto-replied"
    autoreply = any(fields.raw(h) for h in ("x-autoreply", "x-autorespond", "x-autoresponder"))
    sender = from_addresses[0] if len(from_addresses) == 1 and not from_defect else ""
    recipients, unreadable = _recipients(fields)
    message_id = ids[0] if ids else ""
    hops = fields.count("received")
    facts = MessageFacts(
        channel=channel,
        from_addresses=from_addresses,
        from_defect=from_defect,
        recipients=recipients,
        recipients_unreadable=unreadable,
        subject=subject,
        tag=tag,
        thread_ticket=thread_ticket,
        null_return_path=mail_from.strip() in ("", "<>"),
        auto_submitted=auto_submitted,
        precedence=precedence,
        list_id=bool(fields.raw("list-id")),
        autoreply_headers=autoreply,
        delivery_report=report in ("delivery-status", "disposition-notification"),
        dmarc_fail=dmarc_failed(fields, ctx.trusted_authserv_ids, domain_of(sender)),
        headers=tuple(
            (name, clean_text(_safe_str(value)))
            for name in sorted(ctx.wanted_headers)
            for value in _all_values(fields, name)
        ),
        own_mail=channel is not Channel.PANEL and _own_mail(fields, key, domain, message_id),
        answers_notice=threadref.answers_notice(key, domain, in_reply_to),
        hops=hops,
        returned_outbox_id=_returned_row(rcpt_to or [], ctx),
    )
    thread_index = _word(fields, "thread-index")
    link_tokens = _link_tokens(raw, tree, ctx.link_prefix, subject)
    return ParsedMail(
        facts=facts,
        message_id=message_id,
        references=tuple(dict.fromkeys([*references, *message_ids(in_reply_to)])),
        thread_index=thread_index if _THREAD_INDEX.match(thread_index) else None,
        subject=subject,
        headers={
            **{h: _display(fields, h, tree) for h in STORED_HEADERS if fields.raw(h)},
            "hops": str(hops),
        },
        defects=_defects(fields, tree),
        link_tokens=link_tokens,
        report=read_report(tree.msg) if report == "delivery-status" else None,
    )


def _words(fields: Fields, name: str) -> list[str]:
    """Every field ``name`` as text (References may come in several)."""
    if _needs_parser(fields, name):
        return [_safe_str(value) if value is not None else "" for _, value in fields.each(name)]
    return [" ".join(unfold(raw).split()) for raw in fields.raw(name)]


def _needs_parser(fields: Fields, name: str) -> bool:
    """Whether a header of ids holds anything but plain ASCII words (comments,
    encoded words, raw 8-bit): then the email package reads it."""
    return any(
        not raw.isascii() or "=?" in raw or "(" in raw or "\\" in raw for raw in fields.raw(name)
    )


def _may_be_report(fields: Fields) -> bool:
    """A multipart/report names itself in Content-Type (its subtype is one token)."""
    return any("report" in raw.lower() for raw in fields.raw("content-type"))


def _defects(fields: Fields, tree: _Tree) -> tuple[str, ...]:
    """Structural defects: of the MIME tree when it was built, else of the header
    section (`mime_defects` finds the rest for an operator who asks)."""
    if tree.error is not None:
        return (tree.error,)
    if tree.built:
        return tuple(type(d).__name__ for d in getattr(tree.msg, "defects", []))
    return ("MissingHeaderBodySeparatorDefect",) if fields.stray_lines else ()


def mime_defects(raw: bytes) -> list[str]:
    """Every defect the email package finds in the whole MIME tree (for display)."""
    try:
        msg = email.message_from_bytes(raw, policy=policy.default)
        return [type(d).__name__ for part in msg.walk() for d in getattr(part, "defects", [])]
    except Exception as exc:
        return [f"ParseFailure:{type(exc).__name__}"]


def _all_values(fields: Fields, name: str) -> list[Any]:
    """Parsed values, or the raw text where a value does not parse: a marker a rule
    looks for must never disappear because its header is malformed."""
    return [
        raw[:HEADER_PARSE_LIMIT] if value is None else value for raw, value in fields.each(name)
    ]


def thread_of(raw: bytes) -> tuple[str, tuple[str, ...], str | None]:
    """(Message-ID, References, Thread-Index) of a stored message, for a later reply
    to it (the acknowledgement after a click, an operator's answer, a new link)."""
    fields = Fields.of(raw)
    ids = message_ids(_word(fields, "message-id"))
    refs = message_ids(" ".join(clean_text(_safe_str(v)) for v in _words(fields, "references")))
    refs += message_ids(_word(fields, "in-reply-to"))
    thread_index = _word(fields, "thread-index")
    return (
        ids[0] if ids else "",
        tuple(dict.fromkeys(refs))[-50:],
        thread_index if _THREAD_INDEX.match(thread_index) else None,
    )


def body_preview(raw: bytes, limit: int = 4000) -> str:
    """The first text/plain part, decoded leniently, for operators' eyes."""
    try:
        msg = email.message_from_bytes(raw, policy=policy.default)
        part = msg.get_body(preferencelist=("plain", "html"))  # type: ignore[attr-defined]
        if part is None:
            return ""
        return str(part.get_content())[:limit]
    except Exception:
        return "(body could not be decoded)"


def unparsable(
    raw: bytes,
    *,
    channel: Channel,
    error: BaseException,
    mail_from: str = "",
    rcpt_to: list[str] | None = None,
    ctx: ParseContext | None = None,
) -> ParsedMail:
    """Facts for a message the parser gave up on: no trustworthy sender at all.

    It is still stored, classified (``malformed_sender``) and shown to staff; what
    the envelope says needs no parser, so a report to our signed return address
    is still filed under its row (and never copied twice), a bounce still ignored.
    """
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = re.search(rb"^subject:[ \t]*([^\r\n]*)", head, re.IGNORECASE | re.MULTILINE)
    subject = clean_text(match.group(1).decode("utf-8", "replace"), 500) if match else ""
    facts = MessageFacts(
        channel=channel,
        from_addresses=(),
        from_defect=True,
        recipients=(),
        subject=subject,
        null_return_path=mail_from.strip() in ("", "<>"),
        returned_outbox_id=_returned_row(rcpt_to or [], ctx) if ctx is not None else None,
    )
    return ParsedMail(
        facts=facts,
        message_id="",
        references=(),
        thread_index=None,
        subject=subject,
        defects=(f"ParseFailure:{type(error).__name__}",),
    )


_PARTICIPANT_FIELDS = (
    "from",
    "to",
    "cc",
    "bcc",
    "reply-to",
    "sender",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "disposition-notification-to",
)


def participants(raw: bytes) -> frozenset[str]:
    """Every mailbox an address header of a stored message names (From, To, Cc,
    Reply-To, Sender, Bcc, Resent-*, receipts), normalized as the rules normalize
    them: how the GDPR tools find a data subject in mail as stored."""
    fields = Fields.of(raw)
    out: set[str] = set()
    for name in _PARTICIPANT_FIELDS:
        for header in fields.parsed(name):
            out.update(_mailboxes(header, _COSMETIC_IN_LISTS)[0])
    return frozenset(out)
