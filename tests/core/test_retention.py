"""The retention periods and the rule for a purged ticket (pure)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from iqmaild.core.policy import PURGED_TICKET, TicketAction, classify
from iqmaild.core.retention import (
    ERASED,
    Periods,
    cutoffs,
    erase_from,
    mentions,
    months_before,
    strip_personal,
)
from iqmaild.core.vocabulary import Decision, MailKind, Reason
from tests.core.invariants import check_verdict
from tests.core.world import CONFIG, DEV, DIRECTORY, OWNER, STRANGER, T_CLOSED, T_OPEN, mail, tag


@pytest.mark.parametrize(
    ("moment", "months", "expected"),
    [
        (datetime(2026, 12, 1, 9, tzinfo=UTC), 3, datetime(2026, 9, 1, 9, tzinfo=UTC)),
        (datetime(2026, 5, 31, tzinfo=UTC), 3, datetime(2026, 2, 28, tzinfo=UTC)),
        (datetime(2028, 5, 31, tzinfo=UTC), 3, datetime(2028, 2, 29, tzinfo=UTC)),
        (datetime(2027, 1, 15, tzinfo=UTC), 72, datetime(2021, 1, 15, tzinfo=UTC)),
        (datetime(2028, 2, 29, tzinfo=UTC), 24, datetime(2026, 2, 28, tzinfo=UTC)),
    ],
)
def test_months_before_is_calendar_months(
    moment: datetime, months: int, expected: datetime
) -> None:
    assert months_before(moment, months) == expected


def test_the_seed_periods_are_the_defaults() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    c = cutoffs(now, Periods())
    assert (c.personal, c.security, c.claims) == (
        datetime(2026, 9, 1, tzinfo=UTC),
        datetime(2024, 12, 1, tzinfo=UTC),
        datetime(2020, 12, 1, tzinfo=UTC),
    )


def test_personal_details_leave_audit_data_and_erasure_marks_the_address() -> None:
    data = {"email": OWNER, "why": "not_eligible", "messages": 2, "recipient": DEV}
    assert strip_personal(data) == {"why": "not_eligible", "messages": 2}
    assert mentions({"list": ["x@y.test", "Owner@Acme.test "]}, OWNER)
    assert not mentions({"why": "owner"}, OWNER)
    assert erase_from(data, OWNER) == {**data, "email": ERASED}


def _purged(view):  # type: ignore[no-untyped-def]
    return replace(view, purged=True)


def test_a_follow_up_to_a_purged_ticket_opens_a_new_one() -> None:
    facts = mail(OWNER, tag=tag(T_OPEN))
    attached = classify(facts, DIRECTORY, T_OPEN, CONFIG)
    assert attached.ticket is TicketAction.ATTACH and attached.decision is Decision.AUTHORIZED
    for ticket in (_purged(T_OPEN), _purged(T_CLOSED)):
        facts = mail(OWNER, tag=tag(ticket))
        verdict = classify(facts, DIRECTORY, ticket, CONFIG)
        assert verdict.ticket is TicketAction.NEW and verdict.ticket_number is None
        assert verdict.decision is Decision.PENDING and not verdict.reopen
        assert verdict.rules_hit == (PURGED_TICKET,)
        assert [m.kind for m in verdict.mails] == [MailKind.STAFF, MailKind.AUTH_REQUEST]
        assert not any(m.include_code for m in verdict.mails)  # the old code proves nothing
        # Decided as a message that names no ticket at all.
        check_verdict(replace(facts, tag=None), DIRECTORY, None, CONFIG, verdict)


def test_a_stranger_naming_a_purged_ticket_is_an_unknown_sender_not_an_unknown_ticket() -> None:
    ticket = _purged(T_OPEN)
    verdict = classify(mail(STRANGER, tag=tag(ticket)), DIRECTORY, ticket, CONFIG)
    assert verdict.reasons == (Reason.UNKNOWN_SENDER,)
    assert verdict.rules_hit == (PURGED_TICKET, "unknown_sender")
    assert verdict.ticket is TicketAction.NEW
