"""Pure rules of IMAP mode: where a message is filed, batches, and reading answers.

No I/O here: the session (``client.py``) sends, the intake decides nothing
beyond what these functions say, and the unit tests exercise them alone.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from iqmaild.core.addresses import normalize

_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]", re.IGNORECASE)
_FETCH_UID = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_FETCH_SIZE = re.compile(rb"RFC822\.SIZE (\d+)", re.IGNORECASE)
_FETCH_START = re.compile(rb"^\d+ FETCH \(", re.IGNORECASE)
_WAKE = re.compile(rb"^\d+ (EXISTS|RECENT)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Filing:
    """What happens to one processed message in the watched folder."""

    folder: str | None  # None: it stays where it is
    keywords: tuple[str, ...]


def filing_for(
    decision: str | None,
    state: str,
    ticket_number: int | None,
    folders: Mapping[str, str],
    keyword_prefix: str,
) -> Filing:
    """By decision into its folder, with a keyword naming the ticket.

    A dead letter (processing failed ``max_attempts`` times) has no decision:
    it stays in the watched folder, marked, for an operator (``iqmaild message
    list --state dead``). A message without a ticket (ignored mail) gets no
    ticket keyword.
    """
    keywords = (f"{keyword_prefix}{ticket_number}",) if ticket_number else ()
    if state == "dead" or decision is None:
        return Filing(None, (*keywords, f"{keyword_prefix}unprocessed"))
    return Filing(folders.get(decision), keywords)


def batches(sizes: Iterable[tuple[int, int]], max_count: int, max_bytes: int) -> list[list[int]]:
    """UIDs in fetch batches of at most ``max_count`` messages and ``max_bytes``
    (a larger message goes alone), in UID order."""
    out: list[list[int]] = []
    current: list[int] = []
    total = 0
    for uid, size in sorted(sizes):
        if current and (len(current) >= max_count or total + size > max_bytes):
            out.append(current)
            current, total = [], 0
        current.append(uid)
        total += size
    if current:
        out.append(current)
    return out


def uid_set(uids: Iterable[int]) -> str:
    """A compact IMAP sequence set: 1:5,9,11:12."""
    ordered = sorted(set(uids))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}:{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def select_status(lines: Iterable[bytes | bytearray]) -> tuple[int | None, int | None]:
    """UIDVALIDITY and UIDNEXT from a SELECT answer."""
    validity = uidnext = None
    for line in lines:
        if not isinstance(line, bytes | bytearray):
            continue
        if m := _UIDVALIDITY.search(line):
            validity = int(m.group(1))
        if m := _UIDNEXT.search(line):
            uidnext = int(m.group(1))
    return validity, uidnext


def search_uids(lines: list[bytes | bytearray], above: int) -> list[int]:
    """UIDs of a UID SEARCH answer greater than ``above`` (``N:*`` always names
    the highest UID, also when it is below N).

    aioimaplib drops the ``* SEARCH`` word; the last line is the tagged
    completion text, never UIDs.
    """
    out: set[int] = set()
    for line in lines[:-1]:
        if not isinstance(line, bytes | bytearray):
            continue
        for word in bytes(line).split():
            if word.isdigit() and int(word) > above:
                out.add(int(word))
    return sorted(out)


def listed(lines: list[bytes | bytearray]) -> bool:
    """A LIST answer named the folder (anything before the completion line)."""
    return any(isinstance(x, bytes | bytearray) and x.strip() for x in lines[:-1])


def fetch_sizes(lines: Iterable[bytes | bytearray]) -> dict[int, int]:
    """UID -> RFC822.SIZE from a ``UID FETCH (UID RFC822.SIZE)`` answer."""
    out: dict[int, int] = {}
    for line in lines:
        if not isinstance(line, bytes | bytearray):
            continue
        uid, size = _FETCH_UID.search(line), _FETCH_SIZE.search(line)
        if uid and size:
            out[int(uid.group(1))] = int(size.group(1))
    return out


def fetch_bodies(lines: list[bytes | bytearray]) -> list[tuple[int, bytes]]:
    """(UID, raw bytes) from a ``UID FETCH (UID BODY.PEEK[])`` answer.

    aioimaplib hands the literal as a bytearray between the line that opens
    the item (``3 FETCH (UID 7 BODY[] {512}``) and the one that closes it
    (``)``, or `` UID 7)`` when the server puts UID after the body).
    """
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if isinstance(line, bytes) and _FETCH_START.match(line):
            uid_match = _FETCH_UID.search(line)
            body: bytes | None = None
            j = i + 1
            while j < len(lines):
                item = lines[j]
                if isinstance(item, bytearray):
                    body = bytes(item)
                elif _FETCH_START.match(item):
                    break
                elif uid_match is None:
                    uid_match = _FETCH_UID.search(item)
                j += 1
            if uid_match is not None and body is not None:
                out.append((int(uid_match.group(1)), body))
            i = j
        else:
            i += 1
    return out


def wakes(lines: Iterable[bytes | bytearray]) -> bool:
    """An IDLE push that means new mail (not Dovecot's ``OK Still here``)."""
    return any(isinstance(x, bytes | bytearray) and _WAKE.match(x) for x in lines)


# -- envelope facts from the stored header (Dovecot's LMTP/LDA writes them) --

_HEADER = re.compile(rb"^([A-Za-z-]+)[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.MULTILINE)


def envelope(raw: bytes, default_rcpt: str) -> tuple[str, list[str]]:
    """The envelope as the final delivery recorded it: the first ``Return-Path``
    (``<>`` for a bounce: the null sender), and ``Delivered-To``/``X-Original-To``.

    Mail that no MTA delivered (put there by a client) has neither: the sender
    is then unknown, never null (that would silence a real customer as a
    bounce), and the recipient is the desk.
    """
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return_path: str | None = None
    recipients: list[str] = []
    for m in _HEADER.finditer(head):
        name = m.group(1).lower()
        value = b" ".join(m.group(2).split()).decode("utf-8", "replace")
        if name == b"return-path" and return_path is None:
            inner = value.strip()
            return_path = inner[1:-1].strip() if inner.startswith("<") else inner
            return_path = return_path or "<>"
        elif name in (b"delivered-to", b"x-original-to"):
            address = value.strip().strip("<>")
            if normalize(address) is not None and address not in recipients:
                recipients.append(address)
    sender = return_path if return_path is not None else "unknown@imap.invalid"
    return sender[:500], recipients[:100] or [default_rcpt]


# -- folder names: modified UTF-7 (RFC 3501 5.1.3) -----------------------------


def mutf7(name: str) -> str:
    """A folder name as IMAP writes it ("Zgłoszenia" -> "Zg&AUI-oszenia")."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            data = "".join(pending).encode("utf-16-be")
            out.append("&" + base64.b64encode(data).decode().rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def quote(name: str) -> str:
    """A mailbox argument: modified UTF-7, quoted."""
    encoded = mutf7(name).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{encoded}"'
