"""Sliding-window limits for automatic mail (links, notices, acknowledgements).

A forged From of a primary address must not let anyone mail-bomb its owner:
every automatic mail to a recipient (and about a ticket) is counted over
several windows, and the mail is not sent when any window is full.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Window:
    seconds: int
    limit: int


def longest(windows: Iterable[Window]) -> timedelta:
    return timedelta(seconds=max((w.seconds for w in windows), default=0))


def allows(sent_at: Iterable[datetime], now: datetime, windows: Iterable[Window]) -> bool:
    """True when one more mail fits in every window, given the earlier send times."""
    times = list(sent_at)
    for window in windows:
        start = now - timedelta(seconds=window.seconds)
        if sum(1 for t in times if t > start) >= window.limit:
            return False
    return True
