"""Steps that several e2e tests share: open a ticket, confirm it in the browser."""

from __future__ import annotations

from typing import Any

from tests.e2e.conftest import Desk
from tests.e2e.mail import Received, link_in, new_mail, tag_of, verdict, wait_all

OWNER = "owner@acme.test"


def from_desk(r: Received) -> bool:
    return "bok@desk.test" in r.header("From")


def open_ticket(
    desk: Desk, subject: str, sender: str = OWNER, **mail: Any
) -> tuple[int, Received, Received]:
    """A new ticket by mail: its number, the authorization mail, the pending staff copy."""
    desk.send(new_mail(sender, subject, **mail))
    auth, staff = wait_all(
        [(desk.mail[sender], from_desk), (desk.staff, verdict("pending"))], timeout=20
    )
    number, _ = tag_of(auth.subject)
    assert staff.header("X-IQ-Ticket") == str(number), staff.raw[:2000]
    return number, auth, staff


def confirm_in_browser(page: Any, desk: Desk, auth: Received) -> Any:
    """Open the link from the mail and press the button; the confirmation response."""
    response = page.goto(link_in(auth, desk.daemon.base_url))
    assert response is not None and response.status == 200
    with page.expect_navigation() as navigation:
        page.locator("form[method=post] button[type=submit]").click()
    confirmed = navigation.value
    assert confirmed is not None and confirmed.status == 200
    return confirmed


def authorized_ticket(
    desk: Desk, page: Any, subject: str, sender: str = OWNER
) -> tuple[int, str, Received]:
    """A ticket confirmed by its owner: number, full tag, and the acknowledgement."""
    number, auth, _ = open_ticket(desk, subject, sender)
    confirm_in_browser(page, desk, auth)
    ack = desk.mail[sender].wait_for(lambda r: from_desk(r) and r.uid != auth.uid)[0]
    ack_number, code = tag_of(ack.subject)
    assert ack_number == number and code
    desk.staff.wait_for(verdict("authorized", number))
    return number, f"[IQ.pl#{number}:{code}]", ack
