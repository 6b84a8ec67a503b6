"""Normalization of mailbox addresses so that directory look-ups compare alike.

The domain is mapped and encoded as IDNA 2008 with UTS #46, non-transitional
(the ``idna`` package): the form today's resolvers and MTAs look up, so
``faß.de`` stays itself (IDNA 2003 made it ``fass.de``, another domain). The
local part is compared case-insensitively (DESIGN.md) in Unicode NFC, so the
whole address is lowercased; RFC 6531 local parts in UTF-8 are addresses too.
"""

from __future__ import annotations

import re
import unicodedata

import idna

_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}
_ASCII_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

MAX_ADDRESS = 254  # RFC 5321's path limit; also what the database columns hold


def normalize(address: str) -> str | None:
    """The canonical form of ``local@domain``, or None when it is not an address."""
    text = address.strip().strip("<>").strip()
    if not text or len(text) > MAX_ADDRESS or any(ch in _CONTROL or ch.isspace() for ch in text):
        return None
    local, sep, domain = text.rpartition("@")
    if not sep or not local or not domain:
        return None
    if "@" in local and not (len(local) > 1 and local[0] == local[-1] == '"'):
        return None  # an unquoted "@" in the local part
    ascii_domain = normalize_domain(domain)
    if ascii_domain is None:
        return None
    folded = unicodedata.normalize("NFC", local).lower()
    if not local.isascii() and _ascii_count(folded) > _ascii_count(local):
        # A non-ASCII character folded onto ASCII (the Kelvin sign onto "k", the
        # Greek question mark onto ";"): another mailbox for the receiving server,
        # but it would compare equal to a directory address written in ASCII.
        return None
    return f"{folded}@{ascii_domain}"


def _ascii_count(text: str) -> int:
    return sum(ch.isascii() for ch in text)


def normalize_domain(domain: str) -> str | None:
    """The lowercased A-label form of a domain, or None when it is not one."""
    domain = domain.rstrip(".") if domain.endswith(".") and len(domain) > 1 else domain
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        printable = literal and all(c.isascii() and c.isprintable() for c in literal)
        return domain.lower() if printable else None
    if domain.isascii():
        lowered = domain.lower()
        labels = lowered.split(".")
        if not all(_ASCII_LABEL.fullmatch(label) for label in labels):
            return None
        if any(label.startswith("xn--") for label in labels):
            return _idna(lowered)  # an A-label must be a valid one
        return lowered
    return _idna(domain)


def _idna(domain: str) -> str | None:
    try:
        return idna.encode(domain, uts46=True, transitional=False).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def local_part(address: str) -> str:
    return address.rpartition("@")[0]


def split_extension(address: str, delimiter: str) -> tuple[str, str]:
    """``bok+faktury@d`` -> (``bok@d``, ``faktury``); no delimiter, no extension."""
    if not delimiter:
        return address, ""
    local, _, domain = address.rpartition("@")
    base, sep, extension = local.partition(delimiter)
    if not sep or not base:
        return address, ""
    return f"{base}@{domain}", extension
