"""Normalization of mailbox addresses so that directory look-ups compare alike.

The domain is IDNA-encoded and lowercased; the local part is compared
case-insensitively (DESIGN.md), so the whole address is lowercased.
"""

from __future__ import annotations

import unicodedata

_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}


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
    domain = domain.rstrip(".")
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        if not domain.isascii():
            return None
        ascii_domain = domain.lower()
    if not ascii_domain or ascii_domain.startswith(".") or ".." in ascii_domain:
        return None
    if not domain.isascii() and _unicode_form(ascii_domain) != _nfc(domain.lower()):
        # IDNA 2003 mapped more than case (ß -> ss, zero-width characters dropped,
        # full-width folded): the name is not the one written, so two different
        # domains would compare alike. Such an address is not an address.
        return None
    return f"{local.lower()}@{ascii_domain}"


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _unicode_form(ascii_domain: str) -> str | None:
    try:
        return ascii_domain.encode("ascii").decode("idna")
    except UnicodeError:
        return None


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def local_part(address: str) -> str:
    return address.rpartition("@")[0]
