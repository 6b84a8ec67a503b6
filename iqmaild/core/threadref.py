"""Signed ticket references in our outbound Message-IDs.

Mail clients and other helpdesks strip or rewrite subjects; a reply still carries
our Message-ID in In-Reply-To/References. The reference names the ticket and is
signed with the daemon key, so an outsider cannot forge one to file mail under
a ticket of their choosing. It never authorizes: only the code does. Ids are
signed with the ring's current key; one signed with any key of the ring is ours
(a customer replying to mail sent before a rotation still threads).
"""

from __future__ import annotations

import hashlib
import hmac
import re

from iqmaild.core.keys import KeyRing, any_equal, label

_SIG_HEX = 16
_REF = re.compile(
    r"<iq\.([0-9]{1,18})\.([0-9a-z]{6,40})\.([0-9a-f]{16})@([^<>\s]+)>", re.IGNORECASE
)
_UNIQUE = re.compile(r"[0-9a-z]{6,40}")


def _signature(key_id: int, key: bytes, number: int, unique: str) -> str:
    message = label(b"iqmaild-msgid", key_id) + b"\x00%d\x00" % number + unique.encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:_SIG_HEX]


def make_message_id(key: KeyRing | bytes, number: int | None, unique: str, domain: str) -> str:
    """A signed Message-ID of our domain; with a ticket number it names the ticket.

    Without one (mail that must not thread with a ticket) the number is 0, which
    names nothing but still lets us recognise the id as ours when it comes back.
    """
    number = number or 0
    unique = unique.lower()  # the finder checks the signature of the lowercased form
    if number < 0 or not _UNIQUE.fullmatch(unique):
        raise ValueError("a signed reference needs a number >= 0 and 6-40 [0-9a-z]")
    signature = _signature(*KeyRing.of(key).current, number, unique)
    return f"<iq.{number}.{unique}.{signature}@{domain}>"


def _valid(key: KeyRing | bytes, domain: str, match: re.Match[str]) -> int | None:
    number, unique, sig, ref_domain = match.groups()
    if ref_domain.lower() != domain.lower():
        return None
    ring = KeyRing.of(key)
    expected = [_signature(key_id, secret, int(number), unique.lower()) for key_id, secret in ring]
    return int(number) if any_equal(expected, sig.lower()) else None


def is_ours(key: KeyRing | bytes, domain: str, message_id: str) -> bool:
    """A Message-ID we made (with or without a ticket reference)."""
    match = _REF.fullmatch(message_id.strip())
    return match is not None and _valid(key, domain, match) is not None


# The first character of the unique part says what kind of mail of ours an id is.
NOTICE = "n"  # a notice or refusal: why a message was not accepted
AUTOMATIC = "a"  # other automatic mail (the link, the acknowledgement)
PERSON = "h"  # written by a desk operator
STAFF = "s"  # a staff copy of a customer's message, threaded under it


def answers_notice(key: KeyRing | bytes, domain: str, in_reply_to: str) -> bool:
    """In-Reply-To names a notice or refusal of ours (signed: nobody can fake one).

    Answering that with another notice is how a responder that ignores
    Auto-Submitted and the desk would ping-pong.
    """
    for match in _REF.finditer(in_reply_to or ""):
        if _valid(key, domain, match) is not None and match.group(2).lower().startswith(NOTICE):
            return True
    return False


def find_ticket_reference(key: KeyRing | bytes, domain: str, *headers: str) -> int | None:
    """The ticket named by the newest valid signed reference among the given headers.

    Headers are given newest-first (In-Reply-To, then References); within
    References the last id is the newest.
    """
    for header in headers:
        for match in reversed(list(_REF.finditer(header or ""))):
            number = _valid(key, domain, match)
            if number:  # 0: ours, but about no ticket
                return number
    return None
