"""The daemon's key ring: the current key signs, every key of the ring verifies.

A leaked key is rotated by putting a new key (a new id) in front and keeping
the old one behind it for as long as what it signed should still work (codes
in customers' subjects, Message-IDs they reply to, return paths of mail in
flight); dropping it later invalidates exactly what it signed.

The key id is part of what is signed, so two keys can never produce each
other's signatures, and id 0 signs exactly what a single ``secret_key`` always
signed: codes and ids mailed before rotation existed stay valid byte for byte.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class KeyRing:
    """``(key id, key)`` pairs, current first; never empty."""

    keys: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a key ring needs at least one key")
        ids = [key_id for key_id, _ in self.keys]
        if len(set(ids)) != len(ids) or min(ids) < 0:
            raise ValueError("key ids must be distinct and >= 0")

    @classmethod
    def of(cls, key: KeyRing | bytes) -> KeyRing:
        """A ring as given, or a bare key as the ring of one with id 0 (the old behaviour)."""
        return key if isinstance(key, KeyRing) else cls(((0, key),))

    @property
    def current(self) -> tuple[int, bytes]:
        return self.keys[0]

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(key_id for key_id, _ in self.keys)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        return iter(self.keys)


def label(base: bytes, key_id: int) -> bytes:
    """The domain label of a signature under key ``key_id``: unchanged for id 0."""
    return base if key_id == 0 else base + b"\x00k%d" % key_id


def any_equal(expected: Iterator[str] | tuple[str, ...] | list[str], presented: str) -> bool:
    """Constant-time: ``presented`` equals one of ``expected``, every one compared."""
    candidate = presented.encode("ascii", "replace")
    found = False
    for value in expected:
        found |= hmac.compare_digest(value.encode("ascii"), candidate)
    return found
