"""A byte-level MIME writer for the mail we compose ourselves.

Building an ``email.message.EmailMessage`` per mail costs milliseconds (header
objects, a parse of every value we set, the generator's folding); the mail we
send has a fixed, small shape, so it is written here directly as bytes:

- header fields, each a ``str`` ending in CRLF, folded at 78 characters where a
  value allows it and never longer than 998 octets: unstructured text (RFC 2047
  encoded words for what is not ASCII, UTF-8, B or Q whichever is shorter),
  addresses (RFC 5322, RFC 6531 local parts), ``Date`` (UTC), message ids (plain ASCII,
  folded only between ids) and ASCII tokens;
- a ``text/plain`` body, or ``multipart/alternative`` text + HTML, UTF-8,
  quoted-printable (``binascii.b2a_qp``, in C), CRLF line endings, with lines
  that start with "." or "From " encoded so no transport can alter them.

Every value is text we chose or cleaned, but each writer strips what could end
a header anyway: CR, LF, NUL and the other control characters become spaces,
and text that would read as an encoded word is itself encoded. Nothing here
takes or copies a header object of an incoming message (CVE-2024-6923).

``utf8=True`` writes what ``email.policy.SMTPUTF8`` would: raw UTF-8 in header
values, for mail to an RFC 6531 address, which is sent with SMTPUTF8.
"""

from __future__ import annotations

import binascii
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

__all__ = [
    "HARD_LINE_LIMIT",
    "LINE_LIMIT",
    "Field",
    "address",
    "clean_header_text",
    "date",
    "format_date",
    "is_msg_id",
    "message",
    "msg_ids",
    "quoted_printable",
    "token",
    "unstructured",
]

LINE_LIMIT = 78  # RFC 5322 2.1.1: SHOULD, where a value can be folded
HARD_LINE_LIMIT = 998  # MUST, in octets, without the CRLF
_WORD_LIMIT = 900  # a longer unbroken word is split into encoded words
_EW_LIMIT = 75  # RFC 2047 2: an encoded word is at most 75 characters
_EW_PREFIX = "=?utf-8?"  # + "q?" / "b?"
_EW_OVERHEAD = len(_EW_PREFIX) + 2 + 2  # "=?utf-8?q?" ... "?="

_NAME = re.compile(r"[!-9;-~]{1,76}")
# What parse.clean_text removes too: C0 controls, DEL, NEL and the Unicode line separators.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
# RFC 5322 atext; in UTF-8 headers (RFC 6532) every non-ASCII character is atext too.
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")
_ATOM_UTF8 = re.compile(r"(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]|[^\x00-\x7f])+")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")
_DOT_ATOM_UTF8 = re.compile(
    r"(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]|[^\x00-\x7f])+"
    r"(?:\.(?:[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]|[^\x00-\x7f])+)*"
)
_QUOTED_LOCAL = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|[^\x00-\x7f]|\\[\x20-\x7e])*"')
_DOMAIN = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[\x21-\x5a\x5e-\x7e]+\]")
_DOMAIN_UTF8 = re.compile(
    r"(?:[A-Za-z0-9_]|[^\x00-\x7f])(?:(?:[A-Za-z0-9_.-]|[^\x00-\x7f])*(?:[A-Za-z0-9_]|[^\x00-\x7f]))?"
    r"|\[[\x21-\x5a\x5e-\x7e]+\]"
)
# The parser's own rule for ids it keeps (parse._MSGID): printable ASCII but "<" and ">".
_MSG_ID = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]{1,900}>")
_TOKEN = re.compile(r"[\x21-\x7e]{1,900}")

# Q encoding (RFC 2047 4.2) restricted to the characters 5(3) allows in a phrase,
# so one table serves Subject and display names alike; space becomes "_".
_Q_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/"
_Q = [chr(b) if b in _Q_SAFE else f"={b:02X}" for b in range(256)]
_Q[0x20] = "_"
_Q_SAFE_WITH_SPACE = _Q_SAFE + b" "

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# -- header text ----------------------------------------------------------------


def clean_header_text(value: str) -> str:
    """``value`` as a header can hold it: controls become spaces, runs of white space
    one space, no space at either end, unpaired surrogates U+FFFD. Text that is
    already clean (``parse.clean_text``) comes back unchanged."""
    if _SURROGATES.search(value):
        value = _SURROGATES.sub("\ufffd", value)
    return " ".join(_CONTROLS.sub(" ", value).split())


class Field(str):
    """One header field as the writers of this module make it, CRLF included.

    `message` takes nothing else, so a header section is only ever put together
    from values that went through a writer.
    """

    __slots__ = ()


_NAMES_SEEN: set[str] = set()


def _check_name(name: str) -> None:
    if name not in _NAMES_SEEN:
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a header field name: {name!r}")
        if len(_NAMES_SEEN) < 100:
            _NAMES_SEEN.add(name)


def _needs_encoding(word: str, utf8: bool) -> bool:
    """A word that cannot stand in the header as it is: not ASCII (unless the header
    is UTF-8), too long to fit a line, or something a decoder would take for an
    encoded word (the stdlib decodes "=?" even inside words and quoted strings)."""
    if "=?" in word:
        return True
    if utf8:
        return len(word) > _WORD_LIMIT // 4 and len(word.encode()) > _WORD_LIMIT
    return not word.isascii() or len(word) > _WORD_LIMIT


class _Run:
    """Text written as encoded words, split wherever a line needs it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _words_to_tokens(words: list[str], utf8: bool) -> list[str | _Run]:
    """Words as they stand, and runs of words that need encoding.

    White space between two encoded words is invisible (RFC 2047 6.2), so the
    spaces of a run go inside its encoded words. A few short plain words between
    two runs join them: cheaper than closing and opening an encoded word.
    """
    flags = [_needs_encoding(w, utf8) for w in words]
    if not any(flags):
        return list(words)
    # Absorb short plain stretches between two encoded words.
    n = len(words)
    i = 0
    while i < n:
        if flags[i]:
            j = i + 1
            while j < n and not flags[j]:
                j += 1
            if j < n and j > i + 1 and sum(len(w) + 1 for w in words[i + 1 : j]) <= _EW_OVERHEAD:
                for k in range(i + 1, j):
                    flags[k] = True
            i = j
        else:
            i += 1
    tokens: list[str | _Run] = []
    i = 0
    while i < n:
        if flags[i]:
            j = i + 1
            while j < n and flags[j]:
                j += 1
            tokens.append(_Run(" ".join(words[i:j])))
            i = j
        else:
            tokens.append(words[i])
            i += 1
    return tokens


def _q(data: bytes) -> str:
    return "".join([_Q[b] for b in data])


def _b(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _is_continuation(byte: int) -> bool:
    return 0x80 <= byte < 0xC0


def _b_chunks(data: bytes, first: int, rest: int) -> list[bytes]:
    """``data`` cut at character boundaries into pieces whose base64 fits ``first``
    characters (the first piece) and ``rest`` (the others)."""
    pieces: list[bytes] = []
    pos, n, limit = 0, len(data), first
    while pos < n:
        end = min(pos + limit // 4 * 3, n)
        while end < n and end > pos and _is_continuation(data[end]):
            end -= 1
        if end <= pos:  # not even one character fits: take one whole anyway
            end = pos + 1
            while end < n and _is_continuation(data[end]):
                end += 1
        pieces.append(data[pos:end])
        pos, limit = end, rest
    return pieces


def _q_chunks(q: str, first: int, rest: int) -> list[str]:
    """Q-encoded text cut into pieces of at most ``first`` / ``rest`` characters,
    never inside an "=XX" and never before the continuation octet of a character."""
    pieces: list[str] = []
    pos, n, limit = 0, len(q), first
    while pos < n:
        end = min(pos + limit, n)
        if end < n:
            if q[end - 1] == "=":
                end -= 1
            elif end - 2 >= pos and q[end - 2] == "=":
                end -= 2
            while end > pos and q[end] == "=" and q[end + 1] in "89AB":
                end -= 3  # a continuation octet: its character starts further back
            if end <= pos:  # not even one character fits: take one whole anyway
                end = pos + (3 if q[pos] == "=" else 1)
                while end < n and q[end] == "=" and q[end + 1] in "89AB":
                    end += 3
        pieces.append(q[pos:end])
        pos, limit = end, rest
    return pieces


def _encoded_words(text: str, first_room: int, room: int) -> list[str]:
    """``text`` as encoded words: the first at most ``first_room`` characters long
    (0: it starts a new line), the rest at most ``room``. Words hold whole
    characters (RFC 2047 5), never half of a UTF-8 sequence."""
    data = text.encode("utf-8")
    b_len = (len(data) + 2) // 3 * 4
    q_len = len(data) + 2 * len(data.translate(None, _Q_SAFE_WITH_SPACE))
    first = (first_room or room) - _EW_OVERHEAD
    rest = room - _EW_OVERHEAD
    if b_len < q_len:
        if b_len <= first:
            return [_EW_PREFIX + "b?" + _b(data) + "?="]
        return [_EW_PREFIX + "b?" + _b(piece) + "?=" for piece in _b_chunks(data, first, rest)]
    q = _q(data)
    if q_len <= first:
        return [_EW_PREFIX + "q?" + q + "?="]
    return [_EW_PREFIX + "q?" + piece + "?=" for piece in _q_chunks(q, first, rest)]


def _fold(name: str, tokens: Iterable[str | _Run]) -> str:
    """``Name: tokens`` with one space between tokens, each space a possible fold.

    The first token stays on the field's first line; a token that does not fit
    the rest of a line starts the next one. An encoded run fills what is left
    of a line before it folds.
    """
    lines: list[str] = []
    line = name + ":"
    first = True
    for tok in tokens:
        if isinstance(tok, _Run):
            left = min(_EW_LIMIT, LINE_LIMIT - len(line) - 1)
            if left < _EW_OVERHEAD + 12 and not first:
                left = 0  # a word that short is not worth it: the run starts a new line
            words = _encoded_words(tok.text, left, _EW_LIMIT)
        else:
            words = [tok]
        for word in words:
            if first or len(line) + 1 + len(word) <= LINE_LIMIT:
                line += " " + word
            else:
                lines.append(line)
                line = " " + word
            first = False
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


def unstructured(name: str, value: str, *, utf8: bool = False) -> Field:
    """An unstructured field (Subject, Thread-Topic): plain words where they can be,
    encoded words where they cannot."""
    _check_name(name)
    text = clean_header_text(value)
    if not text:
        return Field(name + ":\r\n")
    if "=?" not in text and (text.isascii() or utf8) and len(text.encode()) <= _WORD_LIMIT:
        # Every word can stand as it is: nothing to encode, at most to fold.
        if len(text) + len(name) + 2 <= LINE_LIMIT:
            return Field(f"{name}: {text}\r\n")
        return Field(_fold(name, text.split(" ")))
    return Field(_fold(name, _words_to_tokens(text.split(" "), utf8)))


# -- addresses ------------------------------------------------------------------


def _addr_spec(addr: str, utf8: bool) -> str:
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise ValueError(f"not an address: {addr!r}")
    if not (_DOMAIN_UTF8 if utf8 else _DOMAIN).fullmatch(domain):
        raise ValueError(f"not a domain this header can hold: {domain!r}")
    if (_DOT_ATOM_UTF8 if utf8 else _DOT_ATOM).fullmatch(local) or _QUOTED_LOCAL.fullmatch(local):
        if not utf8 and not local.isascii():
            raise ValueError(f"a UTF-8 local part needs a UTF-8 header: {addr!r}")
        return f"{local}@{domain}"
    # Not a dot-atom (".a", "a..b", "a(b)"): the same mailbox as a quoted string.
    if _CONTROLS.search(local) or " " in local or (not utf8 and not local.isascii()):
        raise ValueError(f"not a local part this header can hold: {local!r}")
    quoted = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{quoted}"@{domain}'


def _phrase(display_name: str, utf8: bool) -> list[str | _Run]:
    words = display_name.split(" ")
    atom = _ATOM_UTF8 if utf8 else _ATOM
    if any(_needs_encoding(w, utf8) for w in words):
        return [_Run(display_name)]  # mixing quoted strings and encoded words gains nothing
    if all(atom.fullmatch(w) for w in words):
        return list(words)
    # Specials: one quoted string, still foldable at its spaces (FWS inside quotes).
    escaped = display_name.replace("\\", "\\\\").replace('"', '\\"').split(" ")
    escaped[0] = '"' + escaped[0]
    escaped[-1] += '"'
    return list(escaped)


def address(name: str, addr_spec: str, display_name: str = "", *, utf8: bool = False) -> Field:
    """A one-mailbox field: ``addr`` alone, or ``display name <addr>``.

    The display name is quoted or encoded as RFC 5322 and 2047 need; the address
    must be a mailbox (a UTF-8 local part or domain only in a UTF-8 header).
    """
    _check_name(name)
    if _CONTROLS.search(addr_spec) or addr_spec != addr_spec.strip():
        raise ValueError(f"not an address: {addr_spec!r}")
    spec = _addr_spec(addr_spec, utf8)
    if len(spec) > _WORD_LIMIT:
        raise ValueError("address too long for a header line")
    text = clean_header_text(display_name)
    if not text:
        return Field(_fold(name, [spec]))
    return Field(_fold(name, [*_phrase(text, utf8), f"<{spec}>"]))


# -- ids, tokens, dates ---------------------------------------------------------


def is_msg_id(value: str) -> bool:
    """``<id>`` in the form our parser keeps: printable ASCII, no white space."""
    return _MSG_ID.fullmatch(value) is not None


def msg_ids(name: str, ids: Sequence[str]) -> Field:
    """Message-ID, In-Reply-To, References: ``<id>`` values, plain ASCII, folded
    only at the spaces between ids, never encoded."""
    _check_name(name)
    if not ids:
        raise ValueError(f"{name} needs at least one id")
    for value in ids:
        if not _MSG_ID.fullmatch(value):
            raise ValueError(f"not a message id: {value!r}")
    return Field(_fold(name, ids))


def token(name: str, value: str) -> Field:
    """A field whose value is one ASCII token (Auto-Submitted, X-IQ-Loop, Thread-Index)."""
    _check_name(name)
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"not an ASCII token: {value!r}")
    return Field(f"{name}: {value}\r\n")


def format_date(when: datetime) -> str:
    """RFC 5322 3.3 date-time in UTC, zone "+0000".

    ``email.utils.format_datetime(when, usegmt=True)`` writes "GMT", which RFC
    5322 4.3 lists as obsolete syntax (to be read, not generated); an
    `EmailMessage` re-renders it as "+0000" anyway, so that is what we sent.
    """
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("a Date needs an aware datetime")
    t = when.astimezone(UTC)
    return (
        f"{_DAYS[t.weekday()]}, {t.day:02d} {_MONTHS[t.month - 1]} {t.year:04d} "
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d} +0000"
    )


def date(name: str, when: datetime) -> Field:
    _check_name(name)
    return Field(f"{name}: {format_date(when)}\r\n")


# -- bodies ---------------------------------------------------------------------

_QP_LINE = 76  # RFC 2045 6.7 (5): characters per line, the "=" of a soft break included
# A line of quoted-printable output that some transport could alter: "." (SMTP's
# end of data when not dot-stuffed) and "From " (mbox).
_UNSAFE_LINE = re.compile(rb"^(?:\.|From )[^\n]*", re.MULTILINE)
# b2a_qp lets a line reach 76 characters before its line break and then encodes a
# space or tab at its end, which makes 78; and so does our soft break at the end.
_LONG_LINE = re.compile(rb"^[^\n]{%d,}" % (_QP_LINE + 1), re.MULTILINE)
_QP_ATOM = re.compile(rb"=[0-9A-F]{2}|[^=]")


def _refold(match: re.Match[bytes]) -> bytes:
    """One physical line of quoted-printable, refolded: at most 76 characters a line,
    none starting with "." or "F" (of "From ")."""
    line = match.group()
    soft = line.endswith(b"=")
    atoms = _QP_ATOM.findall(line[:-1] if soft else line)
    out: list[bytes] = []
    current: list[bytes] = []
    width = 0
    for atom in atoms:
        if width + len(atom) > _QP_LINE - 1:
            out.append(b"".join(current) + b"=")
            current, width = [], 0
        if not current and (atom == b"." or atom == b"F"):
            atom = b"=%02X" % atom[0]
        current.append(atom)
        width += len(atom)
    # At most 75 characters on every line: room for a soft break on the last, too.
    out.append(b"".join(current) + (b"=" if soft else b""))
    return b"\n".join(out)


def _encode_utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # unpaired surrogates: no UTF-8 holds them
        return _SURROGATES.sub("\ufffd", text).encode("utf-8")


def quoted_printable(text: str) -> bytes:
    """``text`` as a quoted-printable body with CRLF line endings.

    Every line break (LF, CRLF, CR) becomes CRLF; a text that does not end with one
    ends with a soft line break, so it decodes exactly as given. Lines are at most
    76 characters; white space before a line break, "=" and every non-ASCII octet
    are encoded, and so is the first character of a line starting "." or "From ".
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    data = _encode_utf8(text)
    encoded = binascii.b2a_qp(data, False, True, False)
    long_lines = b"=20\n" in encoded or b"=09\n" in encoded
    if data and not data.endswith(b"\n"):
        long_lines = long_lines or len(encoded) - encoded.rfind(b"\n") > _QP_LINE
        encoded += b"=\n"
    if long_lines:
        encoded = _LONG_LINE.sub(_refold, encoded)
    if encoded.startswith((b".", b"From ")) or b"\n." in encoded or b"\nFrom " in encoded:
        encoded = _UNSAFE_LINE.sub(_refold, encoded)
    return encoded.replace(b"\n", b"\r\n")


_QP = b"Content-Transfer-Encoding: quoted-printable\r\n"
_TEXT_PART = b"Content-Type: text/plain; charset=utf-8\r\n" + _QP
_HTML_PART = b"Content-Type: text/html; charset=utf-8\r\n" + _QP


def _boundary(parts: Sequence[bytes]) -> bytes:
    # "=_" never occurs in quoted-printable ("=" starts a hex pair or a soft break);
    # the search is a second guard that costs next to nothing.
    while True:
        boundary = b"=_iq_" + secrets.token_hex(12).encode("ascii")
        if not any(boundary in part for part in parts):
            return boundary


def message(
    fields: Sequence[Field], text: str, html: str | None = None, *, utf8: bool = False
) -> bytes:
    """A whole message: ``fields`` (from the writers above, in order), then
    MIME-Version and the body: text/plain, or multipart/alternative of text and
    HTML. Header values must be ASCII unless ``utf8``."""
    for field in fields:
        if type(field) is not Field:
            raise TypeError("header fields must come from the writers of this module")
    head = "".join(fields)
    # The writers' own promise, checked once more where it is cheap: no NUL, and
    # no CR or LF but in CRLF pairs.
    if "\x00" in head or not head.count("\r") == head.count("\n") == head.count("\r\n"):
        raise ValueError("a bare CR, LF or NUL in a header field")
    head_bytes = head.encode("utf-8" if utf8 else "ascii")
    for line in head_bytes.split(b"\r\n"):
        if len(line) > HARD_LINE_LIMIT:
            raise ValueError("a header line over 998 octets")
    body = quoted_printable(text)
    if html is None:
        return b"".join((head_bytes, b"MIME-Version: 1.0\r\n", _TEXT_PART, b"\r\n", body))
    html_body = quoted_printable(html)
    boundary = _boundary((body, html_body))
    delimiter = b"\r\n--" + boundary
    return b"".join(
        (
            head_bytes,
            b'MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary="',
            boundary,
            b'"\r\n\r\n--',
            boundary,
            b"\r\n",
            _TEXT_PART,
            b"\r\n",
            body,
            delimiter,
            b"\r\n",
            _HTML_PART,
            b"\r\n",
            html_body,
            delimiter,
            b"--\r\n",
        )
    )
