"""Raw bytes to `MessageFacts`: the parser side of classification.

Uses ``email.policy.default`` (never ``parseaddr``/``getaddresses``, which
misparse crafted addresses, CVE-2023-27043) and treats every header access as
fallible: bad input becomes defects and facts, never an exception.
"""

from __future__ import annotations

import codecs
import email
import itertools
import re
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import Any

from iqmaild.core import threadref
from iqmaild.core.addresses import domain_of, normalize
from iqmaild.core.facts import MessageFacts
from iqmaild.core.tag import TagFormat
from iqmaild.core.vocabulary import Channel
from iqmaild.ingest.authres import dmarc_failed
from iqmaild.ingest.headers import (
    HEADER_PARSE_LIMIT,
    all_headers,
    as_text,
    parse_header,
    raw_values,
    too_long,
)

_CONTROLS = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]+")
# Raw 8-bit bytes the email package could not decode (surrogate escapes): a str
# holding them cannot be encoded for the database, a log line or a mail.
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_MSGID = re.compile(r"<([\x21-\x3b\x3d\x3f-\x7e]{1,250})>")  # ASCII only: never an encoded word
_THREAD_INDEX = re.compile(r"^[A-Za-z0-9+/=]{1,400}$")
_HEADER_VALUE_LIMIT = 2000
STORED_HEADERS = ("from", "to", "cc", "reply-to", "sender", "subject", "date", "message-id")


def clean_text(value: str, limit: int = _HEADER_VALUE_LIMIT) -> str:
    """Decoded header text with CR/LF/NUL and other controls removed (CVE-2024-6923)."""
    value = _SURROGATES.sub("\ufffd", value)
    return " ".join(_CONTROLS.sub(" ", value).split())[:limit]


def _utf8(text: str) -> str | None:
    """Raw 8-bit from the wire read as UTF-8 (RFC 6532 addresses); None when it is not.

    Strict decoding never yields ASCII from bytes >= 0x80, so this cannot turn
    anything into the address of a directory entry written in ASCII.
    """
    if not _SURROGATES.search(text):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeError:
        return None


@dataclass(frozen=True)
class ParsedMail:
    facts: MessageFacts
    message_id: str  # without angle brackets; "" when absent or unusable
    references: tuple[str, ...]  # message ids, oldest first
    thread_index: str | None  # Outlook's Thread-Index, when well-formed
    subject: str
    headers: dict[str, str] = field(default_factory=dict)
    defects: tuple[str, ...] = ()


def _safe_str(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return ""


def _first(msg: EmailMessage, name: str) -> str:
    values = all_headers(msg, name)
    return clean_text(_safe_str(values[0])) if values else ""


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


def _display(msg: EmailMessage, name: str, charsets: list[str]) -> str:
    """Header text for people: like `_first`, but raw 8-bit read in ``charsets``.

    For display only (Subject, names); addresses always come from `_mailboxes`.
    """
    value = _first(msg, name)
    if "\ufffd" not in value:
        return value
    try:
        raw = raw_values(msg, name)[0][:HEADER_PARSE_LIMIT]
        data = raw.encode("ascii", "surrogateescape")
        data.decode("utf-8")
        return value  # valid UTF-8: the replacement characters were sent as such
    except UnicodeDecodeError:
        pass
    except Exception:
        return value
    for charset in charsets:
        try:
            text = data.decode(charset)
            return clean_text(_safe_str(parse_header(name, text)))
        except Exception:
            continue
    return value


# Decoding trouble in a display name is not a malformed address.
_COSMETIC_DEFECTS = frozenset({"UndecodableBytesDefect", "CharsetError", "NonPrintableDefect"})


def _mailboxes(header: Any) -> tuple[list[str], bool]:
    """Normalized addresses of an address header, and whether it is malformed."""
    defects = getattr(header, "defects", None) or ()
    defective = any(type(d).__name__ not in _COSMETIC_DEFECTS for d in defects)
    out: list[str] = []
    try:
        addresses = header.addresses
    except Exception:
        return out, True
    for address in addresses:
        try:
            spec = _utf8(address.addr_spec)
        except Exception:
            spec = None
        if spec is None:
            defective = True
            continue
        norm = normalize(spec) if address.username and address.domain else None
        if norm is None:
            defective = True
            continue
        out.append(norm)
    return out, defective


def _from_addresses(msg: EmailMessage) -> tuple[tuple[str, ...], bool]:
    raws = raw_values(msg, "from")
    if any(too_long(raw) for raw in raws):
        return (), True  # never decide identity on a From cut short
    headers = all_headers(msg, "from")
    if len(headers) != 1:
        return (), True
    found, defective = _mailboxes(headers[0])
    return tuple(found), defective or len(found) != 1


def _recipients(msg: EmailMessage, limit: int = 5000) -> tuple[str, ...]:
    out: list[str] = []
    for name in ("to", "cc"):
        for header in all_headers(msg, name):
            found, _ = _mailboxes(header)
            out.extend(found)
            if len(out) >= limit:
                return tuple(out[:limit])
    return tuple(out)


def message_ids(value: str) -> list[str]:
    """Message ids in a header value, ASCII only, without angle brackets."""
    return _MSGID.findall(value or "")


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
                    return "".join(
                        f"{k}: {as_text(parse_header(k.lower(), v[:HEADER_PARSE_LIMIT]), 2000)}\n"
                        for k, v in itertools.islice(inner[0].raw_items(), 100)
                        if k.lower() not in ("to", "cc", "bcc")
                    )
    except Exception:
        return ""
    return ""


def parse_message(
    raw: bytes,
    *,
    mail_from: str,
    tags: TagFormat,
    key: bytes,
    msgid_domain: str,
    trusted_authserv_ids: frozenset[str] = frozenset(),
    channel: Channel = Channel.SMTP,
) -> ParsedMail:
    """Everything classification and threading need from one raw message."""
    msg: EmailMessage = email.message_from_bytes(raw, policy=policy.default)  # type: ignore[assignment]
    defects = [type(d).__name__ for d in getattr(msg, "defects", [])]
    from_addresses, from_defect = _from_addresses(msg)
    charsets = _charsets(msg)
    subject = _display(msg, "subject", charsets)
    in_reply_to = _first(msg, "in-reply-to")
    references_text = " ".join(_safe_str(v) for v in all_headers(msg, "references"))
    references = tuple(message_ids(references_text))[-50:]
    ids = message_ids(_first(msg, "message-id"))
    report = _report_type(msg)
    tag = tags.find(subject)
    thread_ticket = threadref.find_ticket_reference(key, msgid_domain, in_reply_to, references_text)
    if report is not None and (tag is None and thread_ticket is None):
        embedded = _embedded_headers(msg)
        thread_ticket = threadref.find_ticket_reference(key, msgid_domain, embedded)
        tag = tags.find(clean_text(embedded, 20000))
    auto_submitted = _first(msg, "auto-submitted").split(";", 1)[0].strip().lower() or None
    precedence = _first(msg, "precedence").lower() or None
    if precedence == "auto_reply" and auto_submitted is None:
        auto_submitted = "auto-replied"
    autoreply = any(
        all_headers(msg, h) for h in ("x-autoreply", "x-autorespond", "x-autoresponder")
    )
    sender = from_addresses[0] if len(from_addresses) == 1 and not from_defect else ""
    header_pairs = []
    for name, raw in itertools.islice(msg.raw_items(), 200):
        if name.lower() in ("to", "cc", "bcc"):
            continue  # recipient lists are facts of their own (and the large ones)
        try:
            value = parse_header(name.lower(), raw[:HEADER_PARSE_LIMIT])
        except Exception:
            continue
        header_pairs.append((name.lower(), clean_text(_safe_str(value))))
    facts = MessageFacts(
        channel=channel,
        from_addresses=from_addresses,
        from_defect=from_defect,
        recipients=_recipients(msg),
        subject=subject,
        tag=tag,
        thread_ticket=thread_ticket,
        null_return_path=mail_from.strip() in ("", "<>"),
        auto_submitted=auto_submitted,
        precedence=precedence,
        list_id=bool(all_headers(msg, "list-id")),
        autoreply_headers=autoreply,
        delivery_report=report in ("delivery-status", "disposition-notification"),
        dmarc_fail=dmarc_failed(msg, trusted_authserv_ids, domain_of(sender)),
        headers=tuple(header_pairs),
    )
    thread_index = _first(msg, "thread-index")
    return ParsedMail(
        facts=facts,
        message_id=ids[0] if ids else "",
        references=tuple(dict.fromkeys([*references, *message_ids(in_reply_to)])),
        thread_index=thread_index if _THREAD_INDEX.match(thread_index) else None,
        subject=subject,
        headers={h: _display(msg, h, charsets) for h in STORED_HEADERS if all_headers(msg, h)},
        defects=tuple(defects),
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


def unparsable(raw: bytes, *, channel: Channel, error: BaseException) -> ParsedMail:
    """Facts for a message the parser gave up on: no trustworthy sender at all.

    It is still stored, classified (``malformed_sender``) and shown to staff.
    """
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    match = re.search(rb"^subject:[ \t]*([^\r\n]*)", head, re.IGNORECASE | re.MULTILINE)
    subject = clean_text(match.group(1).decode("utf-8", "replace"), 500) if match else ""
    facts = MessageFacts(
        channel=channel, from_addresses=(), from_defect=True, recipients=(), subject=subject
    )
    return ParsedMail(
        facts=facts,
        message_id="",
        references=(),
        thread_index=None,
        subject=subject,
        defects=(f"ParseFailure:{type(error).__name__}",),
    )
