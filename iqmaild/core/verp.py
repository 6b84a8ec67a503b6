"""Signed envelope senders (VERP): returned mail names the outbox row it is about.

Every outbound mail leaves with ``base+bounce-<row>-<sig>@domain`` as its
envelope sender, so a delivery report, however it is worded, comes back to an
address that says which row failed. The signature (HMAC under the daemon key)
means only a report about mail we really sent is recognised; a forged report
to a made-up row is refused at RCPT. Mail leaves signed with the ring's current
key; a report is recognised under any key of the ring (mail in flight while a
key is rotated still comes home).
"""

from __future__ import annotations

import hashlib
import hmac
import re

from iqmaild.core.addresses import split_extension
from iqmaild.core.keys import KeyRing, any_equal, label

_SIG_HEX = 12
_EXTENSION = re.compile(r"bounce-([0-9]{1,18})-([0-9a-f]{12})")


def _signature(key_id: int, key: bytes, row: int) -> str:
    mac = hmac.new(key, label(b"iqmaild-verp", key_id) + b"\x00%d" % row, hashlib.sha256)
    return mac.hexdigest()[:_SIG_HEX]


def envelope_sender(key: KeyRing | bytes, row: int, base: str, delimiter: str) -> str:
    """The envelope sender of outbox row ``row``; ``base`` is ``local@domain``."""
    local, _, domain = base.rpartition("@")
    signature = _signature(*KeyRing.of(key).current, row)
    return f"{local}{delimiter}bounce-{row}-{signature}@{domain}"


def returned_row(key: KeyRing | bytes, address: str, base: str, delimiter: str) -> int | None:
    """The outbox row a (normalized) recipient address names, if it is our signed one."""
    if not delimiter:
        return None
    plain, extension = split_extension(address, delimiter)
    if plain != base.lower():
        return None
    match = _EXTENSION.fullmatch(extension)
    if match is None:
        return None
    row = int(match.group(1))
    expected = [_signature(key_id, secret, row) for key_id, secret in KeyRing.of(key)]
    if not any_equal(expected, match.group(2)):
        return None
    return row
