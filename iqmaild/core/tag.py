"""The ticket tag ``[PREFIX#NUMBER:CODE]``: formatting, finding and checking.

The code is a secret: it is derived from a per-ticket nonce with the daemon's key
(so the database alone does not reveal it) and compared in constant time. Mail
carries the code under the ring's current key; a code under any key of the
ring is accepted (a rotated key leaves the codes it made valid until dropped).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from iqmaild.core.keys import KeyRing, any_equal, label

CODE_HEX_DIGITS = 20  # 80 bits

# Reply/forward prefixes of the common mail clients, in several languages.
_REPLY_PREFIX = re.compile(
    r"^\s*(?:(?:re|fw|fwd|aw|wg|odp|pd|sv|vs|vl|tr|rv|r|antw|doorst|res|enc|ynt|ilt)"
    r"\s*(?:\[\d+\]|\(\d+\))?\s*[:：]\s*)+",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TagMatch:
    """A tag found in a Subject; ``code`` is None when the tag carries no code."""

    number: int
    code: str | None


def _tag_pattern(prefix: str) -> re.Pattern[str]:
    # NUMBER is ASCII digits only (``\d`` would take any Unicode digit). CODE takes
    # any run of non-space characters, so that a short, long or non-hex code is a
    # tag with a wrong code rather than no tag at all.
    return re.compile(
        r"\[\s*" + re.escape(prefix) + r"\s*#\s*([0-9]{1,18})\s*(?::\s*([^\s\[\]]*)\s*)?\]",
        re.IGNORECASE,
    )


class TagFormat:
    """Formats and parses tags for one configured prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._pattern = _tag_pattern(prefix)

    def full(self, number: int, code: str) -> str:
        return f"[{self.prefix}#{number}:{code}]"

    def short(self, number: int) -> str:
        return f"[{self.prefix}#{number}]"

    def find(self, subject: str) -> TagMatch | None:
        """The first tag in a decoded, unfolded Subject, if any.

        A tag with an empty or malformed code counts as a tag with a code that
        can never match (``code_mismatch``), not as a missing one.
        """
        for match in self._pattern.finditer(subject):
            number = int(match.group(1))
            if number <= 0:
                continue  # not a ticket number; a later tag may still be one
            raw_code = match.group(2)
            if raw_code is None:
                return TagMatch(number, None)
            return TagMatch(number, raw_code.lower())
        return None

    def strip(self, subject: str) -> str:
        """The customer's subject text without any tag and reply prefixes."""
        text = subject
        for _ in range(5):
            text = self._pattern.sub(" ", text)
            text = _REPLY_PREFIX.sub("", text)
        return " ".join(text.split())


def strip_reply_prefixes(subject: str) -> str:
    return _REPLY_PREFIX.sub("", subject).strip()


def _code(key_id: int, key: bytes, number: int, nonce: bytes) -> str:
    message = label(b"iqmaild-ticket-code", key_id) + b"\x00%d\x00" % number + nonce
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:CODE_HEX_DIGITS]


def derive_code(key: KeyRing | bytes, number: int, nonce: bytes) -> str:
    """The ticket's authorization code to mail: HMAC of (number, nonce) under the
    current key (a bare key is the ring of one, id 0: the code it always was)."""
    key_id, secret = KeyRing.of(key).current
    return _code(key_id, secret, number, nonce)


def accepted_codes(key: KeyRing | bytes, number: int, nonce: bytes) -> tuple[str, ...]:
    """Every code of the ticket that verifies: one per key of the ring, current first."""
    return tuple(_code(key_id, secret, number, nonce) for key_id, secret in KeyRing.of(key))


def code_matches(expected: str | tuple[str, ...], presented: str | None) -> bool:
    """Constant-time comparison of a presented code with the ticket's code(s)."""
    if presented is None:
        return False
    codes = (expected,) if isinstance(expected, str) else expected
    return any_equal(codes, presented.lower())
