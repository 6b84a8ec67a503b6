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


@dataclass(frozen=True)
class Limits:
    per_recipient_10min: int
    per_recipient_day: int
    per_ticket_day: int
    unknown_sender_domain_hour: int
    unknown_sender_hour: int


@dataclass
class Quota:
    """Automatic mail already sent, and the filter every new one passes.

    Built from what the outbox holds for the recipients of one batch; each mail
    the filter lets through is counted at once, so several messages of one
    batch share the windows as if they had come one after another.
    """

    now: datetime
    limits: Limits
    sent_to: dict[str, list[datetime]]  # recipient -> times of automatic mail (last day)
    per_ticket: dict[int, int]  # ticket id -> automatic mail in the last day
    suppressed: dict[str, datetime]  # address -> suppressed until (bounced)
    refusals: list[tuple[str, bool]]  # refusals of the last hour: (recipient, to a stranger)

    def check(
        self, recipient: str, ticket_id: int | None, *, refusal_to_stranger: bool = False
    ) -> str | None:
        """Why this automatic mail must not go now, or None."""
        until = self.suppressed.get(recipient)
        if until is not None and until > self.now:
            return "bounced"
        if refusal_to_stranger:
            # Forged spam makes notices to strangers backscatter: victim+1@, victim+2@...
            # each have their own per-recipient window, so cap the domain and the whole.
            domain = recipient.rpartition("@")[2]
            strangers = [r for r, stranger in self.refusals if stranger]
            same_domain = sum(1 for r in self.refusals if r[0].rpartition("@")[2] == domain)
            if same_domain >= self.limits.unknown_sender_domain_hour:
                return "unknown_sender_domain_rate_limit"
            if len(strangers) >= self.limits.unknown_sender_hour:
                return "unknown_sender_rate_limit"
        windows = (
            Window(600, self.limits.per_recipient_10min),
            Window(86400, self.limits.per_recipient_day),
        )
        if not allows(self.sent_to.get(recipient, ()), self.now, windows):
            return "recipient_rate_limit"
        if (
            ticket_id is not None
            and self.per_ticket.get(ticket_id, 0) >= self.limits.per_ticket_day
        ):
            return "ticket_rate_limit"
        return None

    def record(
        self,
        recipient: str,
        ticket_id: int | None,
        *,
        refusal: bool = False,
        stranger: bool = False,
    ) -> None:
        self.sent_to.setdefault(recipient, []).append(self.now)
        if ticket_id is not None:
            self.per_ticket[ticket_id] = self.per_ticket.get(ticket_id, 0) + 1
        if refusal:
            self.refusals.append((recipient, stranger))
