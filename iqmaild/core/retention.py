"""How long what is kept, after the seed's RODO/GDPR clause (pure: the clock is an argument).

The seed (IQ PL's information clause) names three purposes and their periods,
which are the defaults here:

- handling the enquiry (art. 6(1)(b)): personal data of the correspondence "no
  longer than 3 months after the communication ends";
- establishing and defending claims (art. 6(1)(f)): "until the claims are
  time-barred, no longer than 6 years" -- kept in a minimal form: ticket number,
  dates, decisions, SHA-256 of what was received and sent, no personal data;
- protecting the systems (art. 6(1)(f)): "no longer than 2 years" -- the
  security events (authorization attempts, link confirmations, refused mail).
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# Audit events that record the protection of the system: kept `security_years`.
# Every other audit event belongs to the claims record (`claims_years`).
SECURITY_EVENTS = frozenset(
    {
        "message.classified",  # every authorization attempt, with its decision and rules
        "authlink.confirmed",
        "authlink.refused",
        "authlink.burned",
        "authlink.reissued",
        "autoreply.suppressed",  # refused or withheld mail
        "suppression.added",
        "outbox.returned",
        "ticket.code_rotated",
    }
)

# Keys of audit data that hold personal data (addresses, names, subjects): taken
# out when the correspondence they belong to is purged, and on erasure.
PERSONAL_KEYS = frozenset(
    {"email", "recipient", "recipients", "sender", "address", "addresses", "name", "subject"}
)

ERASED = "(erased)"


@dataclass(frozen=True)
class Periods:
    """The retention periods (config ``[retention]``)."""

    personal_data_months: int = 3
    claims_years: int = 6
    security_years: int = 2


@dataclass(frozen=True)
class Cutoffs:
    """Everything older than these is due, for its kind."""

    personal: datetime  # correspondence whose communication ended before it is purged
    claims: datetime  # claims records older than it are deleted
    security: datetime  # security events older than it are deleted


def months_before(moment: datetime, months: int) -> datetime:
    """``moment`` moved back by calendar months (31 May - 3 months = 28/29 Feb)."""
    index = moment.year * 12 + (moment.month - 1) - months
    year, month = divmod(index, 12)
    month += 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def cutoffs(now: datetime, periods: Periods) -> Cutoffs:
    return Cutoffs(
        personal=months_before(now, periods.personal_data_months),
        claims=months_before(now, periods.claims_years * 12),
        security=months_before(now, periods.security_years * 12),
    )


def strip_personal(data: Mapping[str, Any]) -> dict[str, Any]:
    """Audit data without its personal details (the event, its counts and codes stay)."""
    return {k: v for k, v in data.items() if k not in PERSONAL_KEYS}


def mentions(value: Any, address: str) -> bool:
    """``value`` (audit data) holds ``address`` (normalized), compared case-insensitively."""
    if isinstance(value, str):
        return value.strip().lower() == address
    if isinstance(value, Mapping):
        return any(mentions(v, address) for v in value.values())
    if isinstance(value, list | tuple):
        return any(mentions(v, address) for v in value)
    return False


def erase_from(data: Mapping[str, Any], address: str) -> dict[str, Any]:
    """Audit data with every value naming ``address`` replaced by a mark."""

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return ERASED if value.strip().lower() == address else value
        if isinstance(value, Mapping):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return {k: clean(v) for k, v in data.items()}
