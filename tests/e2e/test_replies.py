"""Replies as real clients write them, through the MTA, after authorization.

Each carries the code in its Subject (the customer answers the
acknowledgement): filed as `authorized` under the same ticket.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import Desk
from tests.e2e.flows import OWNER, authorized_ticket
from tests.e2e.mail import copy_of, gmail_reply, outlook_reply, parse, thunderbird_reply, verdict

CLIENTS = {
    "outlook": outlook_reply,
    "thunderbird": thunderbird_reply,
    "gmail": gmail_reply,
}
TOPIC = "Awaria poczty – skrzynka pełna"


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_reply_with_code_is_authorized_under_the_ticket(desk: Desk, page: Any, client: str) -> None:
    number, tag, ack = authorized_ticket(desk, page, TOPIC)
    write: Callable[..., bytes] = CLIENTS[client]
    raw = write(ack.msg, OWNER, tag, TOPIC, f"Odpowiedź z {client}: nadal zażółć gęślą jaźń.")
    sent = parse(raw)
    desk.send(raw, mail_from=OWNER)

    copies = desk.staff.wait_for(verdict("authorized", number), count=2)
    staff = copies[-1]
    assert staff.header("X-IQ-Reasons") in ("", "none")
    assert staff.header("X-IQ-Account") == "acme"
    assert copy_of(sent)(staff)  # the customer's message itself, under its own id
    assert "nadal zażółć gęślą jaźń" in staff.text()

    ticket = desk.wait_ticket(number, lambda t: len(t["messages"]) == 2)
    assert ticket["authorization"] == "authorized"
    last = ticket["messages"][-1]
    assert (last["decision"], last["reasons"], last["sender_role"]) == (
        "authorized",
        [],
        "primary",
    )
    assert len(desk.daemon.tickets()) == 1  # no new ticket for a reply
