"""Normalization of mailbox addresses so that directory look-ups compare alike.

The domain is IDNA-encoded and lowercased; the local part is compared
case-insensitively (DESIGN.md), so the whole address is lowercased.
"""

from __future__ import annotations

_CONTROL = {chr(c) for c in range(0x20)} | {"\x7f"}


def normalize(address: str) -> str | None:
    """The canonical form of ``local@domain``, or None when it is not an address."""
    text = address.strip().strip("<>").strip()
    if not text or any(ch in _CONTROL or ch.isspace() for ch in text):
        return None
    local, sep, domain = text.rpartition("@")
    if not sep or not local or not domain:
        return None
    domain = domain.rstrip(".")
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        if not domain.isascii():
            return None
        ascii_domain = domain
    if not ascii_domain or ascii_domain.startswith(".") or ".." in ascii_domain:
        return None
    return f"{local.lower()}@{ascii_domain.lower()}"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


def local_part(address: str) -> str:
    return address.rpartition("@")[0]
