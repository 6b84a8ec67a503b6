"""Authentication-Results (RFC 8601): what our own MTA said about DMARC.

Only headers whose authserv-id is configured as trusted count; anything else
in a message is the sender's claim. The first trusted header is the one our
MTA prepended.
"""

from __future__ import annotations

import re

from iqmaild.parse.headers import Fields, as_text


def dmarc_failed(fields: Fields, trusted: frozenset[str], from_domain: str) -> bool:
    """DMARC failure reported by the first Authentication-Results of a trusted host."""
    if not trusted or not from_domain:
        return False
    for value in fields.parsed("authentication-results"):
        text = as_text(value)
        authserv = text.split(";", 1)[0].strip().split()[0].lower() if text else ""
        if authserv not in trusted:
            continue
        match = re.search(r"\bdmarc\s*=\s*(\w+)(?P<rest>[^;]*)", text, re.IGNORECASE)
        if match is None:
            return False
        header_from = re.search(r"header\.from\s*=\s*([^\s;]+)", match.group("rest"), re.I)
        if header_from and header_from.group(1).lower().rstrip(".") != from_domain:
            return False
        return match.group(1).lower() == "fail"
    return False
