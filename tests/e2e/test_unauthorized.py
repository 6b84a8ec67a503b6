"""The seed's unauthorized cases, through the real MTA (DESIGN.md, the rule table).

Each message goes from the customer's server into Postfix, Postfix hands it to
the daemon, and the staff copy comes back through Postfix into the staff
mailbox with the verdict in X-IQ-Authorization / X-IQ-Reasons. The sender gets
a notice (the seed: "explains which rule applied and how to authorize").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.e2e.conftest import Desk
from tests.e2e.flows import OWNER, from_desk, open_ticket
from tests.e2e.mail import copy_of, header_list, new_mail, verdict


@dataclass
class Case:
    sender: str
    reasons: list[str]
    role: str
    cc: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)


CASES = {
    # 1. an address not assigned to the account
    "unknown_sender": Case("stranger@unknown.test", ["unknown_sender"], "unknown"),
    # 2. an address declared as technical or additional
    "technical_address": Case("tech@acme.test", ["technical_address"], "technical"),
    "additional_address": Case("extra@acme.test", ["additional_address"], "additional"),
    # 3. submitted from the administration panel (IQ.Admin)
    "admin_panel": Case(OWNER, ["admin_panel"], "primary", headers={"X-Mailer": "IQ.Admin 4.2"}),
    # 4. someone in CC to whom the service has not been shared
    "unshared_cc": Case(OWNER, ["unshared_cc"], "primary", cc=["friend@elsewhere.test"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unauthorized_case_through_the_mta(desk: Desk, case: str) -> None:
    c = CASES[case]
    msg = new_mail(c.sender, f"Zmiana hasła ({case})", cc=c.cc, headers=c.headers)
    # The customer's server sends one copy to every recipient, as mail clients do.
    desk.send(msg, rcpts=["bok@desk.test", *c.cc])

    staff = desk.staff.wait_for(verdict("unauthorized"))[0]
    assert header_list(staff, "X-IQ-Reasons") == c.reasons, staff.header("X-IQ-Reasons")
    assert copy_of(msg)(staff)
    number = int(staff.header("X-IQ-Ticket"))

    ticket = desk.daemon.ticket(number)
    assert ticket["authorization"] == "unauthorized"
    [stored] = ticket["messages"]
    assert (stored["decision"], stored["reasons"], stored["sender_role"]) == (
        "unauthorized",
        c.reasons,
        c.role,
    )

    # The sender is told, by a notice from the desk, without a live link.
    notice = desk.mail[c.sender].wait_for(from_desk)[0]
    assert notice.header("Auto-Submitted") == "auto-replied"
    assert "/authorize/" not in notice.text()
    # An unshared CC gets the customer's own mail (the customer sent it), nothing from us.
    for cc in c.cc:
        got = desk.mail[cc].wait_for(lambda r: r.msg["Message-ID"] == msg["Message-ID"])
        assert got and not any(from_desk(r) for r in desk.mail[cc].poll())


def test_a_stranger_replying_to_someone_elses_ticket_learns_nothing(desk: Desk) -> None:
    """A notice to someone who may not act on a ticket reveals nothing of it."""
    number, _, _ = open_ticket(desk, "Tajny projekt Sokół: zmiana DNS")
    desk.send(new_mail("stranger@unknown.test", f"Re: [IQ.pl#{number}] przejęcie"))
    staff = desk.staff.wait_for(verdict("unauthorized"))[0]
    assert "unknown_sender" in header_list(staff, "X-IQ-Reasons")
    notice = desk.mail["stranger@unknown.test"].wait_for(from_desk)[0]
    text = notice.subject + "\n" + notice.text()
    assert "Sokół" not in text and "acme" not in text.lower(), text
    assert desk.daemon.ticket(number)["authorization"] == "pending"


def test_forged_verdict_headers_do_not_survive_the_trip(desk: Desk) -> None:
    """X-IQ-* headers from outside are removed before ours are added."""
    msg = new_mail(
        "stranger@unknown.test",
        "Proszę o reset hasła",
        headers={
            "X-IQ-Authorization": "authorized",
            "X-IQ-Reasons": "none",
            "X-IQ-Account": "acme",
        },
    )
    desk.send(msg)
    staff = desk.staff.wait_for(copy_of(msg))[0]
    assert staff.msg.get_all("X-IQ-Authorization") == ["unauthorized"]
    assert staff.msg.get_all("X-IQ-Account") == ["none"]
    assert header_list(staff, "X-IQ-Reasons") == ["unknown_sender"]
