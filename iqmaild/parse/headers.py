"""The header section as an MTA reads it, with bounded, never-raising access.

We split the header section ourselves instead of trusting the ``email``
parser's view of it: that parser ends the headers at the first line it does
not like (``Cc : x`` in obsolete syntax, a stray line), and everything after it
would silently become body, including recipients a rule must see. Here every
field up to the first empty line counts, with whitespace before the colon
allowed as RFC 5322's obsolete syntax allows it. A bare CR ends a line, as it
does for the ``email`` package and for clients that show the mail to people: a
field after one (``Subject: x<CR>Cc: outsider``) is a field, not part of the
one before. The section itself still ends only at an empty line an MTA sees.

Header parsing in the standard library is superlinear in address count: one
5 MB Cc would cost minutes of CPU. Every structured parse here sees at most
`HEADER_PARSE_LIMIT` characters; callers learn when a value was cut. A message
is a thousand such fields as easily as one (a 1 MB header section of To fields
took a minute, 25 MB would take half an hour), so the fields of one name (To and
Cc together) share a budget of `PARSE_BUDGET` characters: beyond it a field
reads as unparseable, which every caller treats as unreadable (fail closed).
Per name, so To and Cc cannot use up what Authentication-Results needs.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from typing import Any

HEADER_PARSE_LIMIT = 64 * 1024
PARSE_BUDGET = HEADER_PARSE_LIMIT  # characters parsed per field name and message
_BUDGET_GROUP = {"cc": "to"}  # the recipient lists share one
MAX_FIELDS = 10_000
ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender"})
_LINE = re.compile(rb"\r\n|\r|\n")
_FIELD = re.compile(r"([\x21-\x39\x3b-\x7e]{1,200})[ \t]*:(.*)", re.DOTALL)
_LINESEP = re.compile(r"\r\n|\r|\n")


def split_head(raw: bytes) -> tuple[bytes, bytes]:
    """(header section, body) at the first empty line; no empty line, no body."""
    match = re.search(rb"(?:\r\n|\n)(?:\r\n|\n)", raw)
    if match is None:
        return raw, b""
    return raw[: match.start()], raw[match.end() :]


@dataclass(frozen=True)
class Fields:
    """Every field of a header section: (lowercased name, raw folded value)."""

    items: tuple[tuple[str, str], ...]
    truncated: bool = False  # more than MAX_FIELDS fields: the rest were not read
    stray_lines: bool = False  # lines in the header section that are not fields
    _parsed: dict[str, list[tuple[str, Any]]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _spent: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, raw: bytes) -> Fields:
        head, _ = split_head(raw)
        items: list[tuple[str, list[str]]] = []
        truncated = stray = False
        for line in _LINE.split(head):
            value = line.decode("ascii", "surrogateescape")  # as the email package reads bytes
            if value[:1] in (" ", "\t"):
                if items:
                    items[-1][1].append(value)
                continue
            match = _FIELD.fullmatch(value)
            if match is None:
                stray = True
                continue  # not a field: neither ends the section nor hides what follows
            if len(items) >= MAX_FIELDS:
                truncated = True
                break
            items.append((match.group(1).lower(), [match.group(2)]))
        return cls(tuple((name, "\r\n".join(parts)) for name, parts in items), truncated, stray)

    def raw(self, name: str) -> list[str]:
        return [value for key, value in self.items if key == name]

    def names(self) -> Iterator[str]:
        return (key for key, _ in self.items)

    def each(self, name: str) -> list[tuple[str, Any]]:
        """Every field ``name`` as (raw, parsed value or None when it does not
        parse), parsed once however often it is asked for."""
        cached = self._parsed.get(name)
        if cached is not None:
            return cached
        out = [(raw, self._parse(name, raw)) for raw in self.raw(name)]
        self._parsed[name] = out
        return out

    def first(self, name: str) -> Any:
        """The first field ``name`` that parses, parsing no further than that."""
        cached = self._parsed.get(name)
        if cached is not None:
            return next((value for _, value in cached if value is not None), None)
        for raw in self.raw(name):
            value = self._parse(name, raw)
            if value is not None:
                return value
        return None

    def _parse(self, name: str, raw: str) -> Any:
        """`parse_header` within the name's budget (the first field always gets its
        own cut-off parse); None when it does not parse or is beyond the budget."""
        group = _BUDGET_GROUP.get(name, name)
        cost = min(len(raw), HEADER_PARSE_LIMIT)
        spent = self._spent.get(group, 0)
        if spent and spent + cost > PARSE_BUDGET:
            return None
        self._spent[group] = spent + cost
        try:
            return parse_header(name, raw)
        except Exception:
            return None

    def parsed(self, name: str) -> list[Any]:
        """Every field ``name``, parsed (size-capped); one that cannot be parsed is
        left out."""
        return [value for _, value in self.each(name) if value is not None]

    def text(self, name: str) -> str:
        """The first field ``name`` as one line of text, for values that are plain
        ASCII words (ids, tokens, most dates): no header parser needed; otherwise
        decoded as the email package does."""
        raws = self.raw(name)
        if not raws:
            return ""
        value = " ".join(unfold(raws[0]).split())
        if value.isascii() and "=?" not in value and "(" not in value and "\\" not in value:
            return value[:HEADER_PARSE_LIMIT]
        first = self.first(name)
        return as_text(first, HEADER_PARSE_LIMIT) if first is not None else ""

    def count(self, name: str) -> int:
        return sum(1 for key in self.names() if key == name)


def unfold(raw: str) -> str:
    return "".join(_LINESEP.split(raw))


def too_long(raw: str) -> bool:
    return len(unfold(raw)) > HEADER_PARSE_LIMIT


def parse_header(name: str, raw: str) -> Any:
    """A structured header from a raw value, unfolded and size-capped.

    Address lists are cut at a comma; callers that must not act on a cut list
    check `too_long` first.
    """
    value = unfold(raw).lstrip(" \t")
    if len(value) > HEADER_PARSE_LIMIT:
        cut = value.rfind(",", 0, HEADER_PARSE_LIMIT) if name in ADDRESS_HEADERS else -1
        value = value[: cut if cut > 0 else HEADER_PARSE_LIMIT]
    return policy.default.header_factory(name, value)


def as_text(value: Any, limit: int = 4000) -> str:
    try:
        return " ".join(str(value).split())[:limit]
    except Exception:
        return ""
