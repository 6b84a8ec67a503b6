"""A signed mark on every mail we send, so our own mail coming back is a loop.

A routing mistake (a staff mailbox that forwards to the desk, a customer's
redirect) returns our own mail as if a customer wrote it. Every outbound mail
carries ``X-IQ-Loop: <unique>.<sig>``; incoming mail with a valid mark is ours
and is never answered or copied to staff again. Only the daemon key makes a
valid mark; copying one into a message only gets that message ignored. Marks
are made with the ring's current key and recognised under any of its keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from iqmaild.core.keys import KeyRing, any_equal, label

HEADER = "X-IQ-Loop"
_SIG_HEX = 16
_MARK = re.compile(r"\s*([0-9a-z]{6,40})\.([0-9a-f]{16})\s*")


def _signature(key_id: int, key: bytes, unique: str) -> str:
    message = label(b"iqmaild-loop", key_id) + b"\x00" + unique.encode("ascii")
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:_SIG_HEX]


def make_mark(key: KeyRing | bytes, unique: str) -> str:
    unique = unique.lower()
    if not re.fullmatch(r"[0-9a-z]{6,40}", unique):
        raise ValueError("a loop mark needs 6-40 [0-9a-z]")
    return f"{unique}.{_signature(*KeyRing.of(key).current, unique)}"


def is_ours(key: KeyRing | bytes, value: str) -> bool:
    match = _MARK.fullmatch(value.lower())
    if match is None:
        return False
    unique = match.group(1)
    expected = [_signature(key_id, secret, unique) for key_id, secret in KeyRing.of(key)]
    return any_equal(expected, match.group(2))
