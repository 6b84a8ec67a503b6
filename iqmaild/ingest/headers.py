"""Header access that is bounded and never raises.

Header parsing in the standard library is superlinear in address count: one
5 MB Cc would cost minutes of CPU. Every structured parse here sees at most
`HEADER_PARSE_LIMIT` characters; an address header cut short is reported, so
identity is never decided on a truncated From.
"""

from __future__ import annotations

import re
from email import policy
from email.message import Message
from typing import Any

HEADER_PARSE_LIMIT = 64 * 1024
ADDRESS_HEADERS = frozenset({"from", "to", "cc", "bcc", "reply-to", "sender"})
_LINESEP = re.compile(r"\r\n|\r|\n")


def raw_values(msg: Message, name: str) -> list[str]:
    """The raw (folded, possibly 8-bit surrogate-escaped) values of header ``name``."""
    try:
        return [raw for key, raw in msg.raw_items() if key.lower() == name]
    except Exception:
        return []


def too_long(raw: str) -> bool:
    return len(raw) > HEADER_PARSE_LIMIT


def parse_header(name: str, raw: str) -> Any:
    """A structured header from a raw value, unfolded and size-capped.

    Address lists are cut at a comma; callers that must not act on a cut list
    (From, Sender) check `too_long` first.
    """
    value = "".join(_LINESEP.split(raw))
    if len(value) > HEADER_PARSE_LIMIT:
        cut = value.rfind(",", 0, HEADER_PARSE_LIMIT) if name in ADDRESS_HEADERS else -1
        value = value[: cut if cut > 0 else HEADER_PARSE_LIMIT]
    return policy.default.header_factory(name, value)


def all_headers(msg: Message, name: str) -> list[Any]:
    """Every header ``name``, parsed; one that cannot be parsed is left out."""
    out: list[Any] = []
    for raw in raw_values(msg, name):
        try:
            out.append(parse_header(name, raw))
        except Exception:
            continue
    return out


def as_text(value: Any, limit: int = 4000) -> str:
    try:
        return " ".join(str(value).split())[:limit]
    except Exception:
        return ""
