"""The customer story through the real MTA and a real browser (issue 7, section 2).

Customer mail -> Postfix -> daemon (smtp: and lmtp: transports) -> the
authorization mail in the customer's Dovecot mailbox -> the link opened in
headless Chromium: the page alone authorizes nothing, the button does -> the
acknowledgement and the authorized staff copy arrive in their mailboxes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import Desk
from tests.e2e.flows import from_desk, open_ticket
from tests.e2e.mail import (
    Received,
    copy_of,
    link_in,
    new_mail,
    outlook_reply,
    tag_of,
    verdict,
    wait_all,
)

OWNER = "owner@acme.test"
# The bound: acknowledgement and staff copy within 2 s of the click
# (test_acknowledgement_and_staff_copy_within_2s_of_the_click, with the default
# idle timer); the story itself checks a generous bound and prints what it measured.
CLICK_TO_MAILBOX_SECONDS = 2.0
GENEROUS_SECONDS = 8.0


def open_authorization(desk: Desk, subject: str) -> tuple[int, Received, Received]:
    return open_ticket(desk, subject, OWNER)


@pytest.mark.parametrize("transport", ["smtp", "lmtp"])
def test_customer_story(
    make_desk: Callable[..., Desk], page: Any, transport: str, record_property: Any
) -> None:
    desk = make_desk(protocol=transport)
    number, auth, pending_copy = open_authorization(desk, "Problem z pocztą")
    assert "Problem z pocztą" in auth.subject
    assert auth.header("Auto-Submitted") == "auto-replied"
    assert pending_copy.header("X-IQ-Authorization") == "pending"
    assert pending_copy.header("X-IQ-Account") == "acme"
    ticket = desk.daemon.ticket(number)
    assert ticket["authorization"] == "pending"
    assert [m["decision"] for m in ticket["messages"]] == ["pending"]

    # The GET page alone authorizes nothing (mail scanners pre-fetch links).
    url = link_in(auth, desk.daemon.base_url)
    response = page.goto(url)
    assert response is not None and response.status == 200
    assert str(number) in page.content()
    button = page.locator("form[method=post] button[type=submit]")
    assert button.count() == 1
    page.reload()  # a second look, as a scanner and then the customer would do
    time.sleep(0.5)
    ticket = desk.daemon.ticket(number)
    assert ticket["authorization"] == "pending", ticket
    assert [m["decision"] for m in ticket["messages"]] == ["pending"]
    assert not any(r.header("X-IQ-Authorization") == "authorized" for r in desk.staff.poll())

    # The click does.
    button = page.locator("form[method=post] button[type=submit]")
    with page.expect_navigation() as navigation:
        clicked = time.monotonic()
        button.click()
    confirmed = navigation.value
    assert confirmed is not None and confirmed.status == 200, confirmed
    page_done = time.monotonic() - clicked
    ack, staff = wait_all(
        [
            (desk.mail[OWNER], lambda r: from_desk(r) and r.uid != auth.uid),
            (desk.staff, verdict("authorized", number)),
        ],
        timeout=30,
    )
    ack_after, staff_after = ack.seen_at - clicked, staff.seen_at - clicked
    record_property("click_to_ack_seconds", round(ack_after, 3))
    record_property("click_to_staff_seconds", round(staff_after, 3))
    print(
        f"\n[{transport}] click -> confirmation page {page_done:.3f}s, "
        f"acknowledgement in mailbox {ack_after:.3f}s, authorized staff copy {staff_after:.3f}s"
    )

    ticket = desk.daemon.ticket(number)
    assert ticket["authorization"] == "authorized"
    assert [m["decision"] for m in ticket["messages"]] == ["authorized"]
    ack_number, code = tag_of(ack.subject)
    assert ack_number == number and code, ack.subject
    assert ack.subject.count(f"[IQ.pl#{number}:{code}]") == 1
    assert "Problem z pocztą" in ack.subject
    assert ack.header("Auto-Submitted") == "auto-replied"
    assert staff.header("X-IQ-Account") == "acme"

    # The link is spent: opening it again says so, without authorizing anything twice.
    again = page.goto(url)
    assert again is not None and again.status == 410

    # The customer answers from Outlook, with the code: authorized, same ticket.
    reply = outlook_reply(
        ack.msg, OWNER, f"[IQ.pl#{number}:{code}]", "Problem z pocztą", "Nadal nie działa."
    )
    desk.send(reply, mail_from=OWNER)
    follow = desk.staff.wait_for(verdict("authorized", number), count=2)[-1]
    assert follow.header("X-IQ-Reasons") in ("", "none")
    ticket = desk.wait_ticket(number, lambda t: len(t["messages"]) == 2)
    assert [m["decision"] for m in ticket["messages"]] == ["authorized", "authorized"]

    # Checked last, so that everything above is verified whatever the latency.
    assert ack_after <= GENEROUS_SECONDS, f"acknowledgement {ack_after:.2f}s after click"
    assert staff_after <= GENEROUS_SECONDS, f"staff copy {staff_after:.2f}s after click"


def test_acknowledgement_and_staff_copy_within_2s_of_the_click(
    make_desk: Callable[..., Desk], page: Any
) -> None:
    # The production default of the timer that currently paces the outbox.
    desk = make_desk(outbound={"idle_close_seconds": 20.0})
    number, auth, _ = open_authorization(desk, "Problem z pocztą")
    page.goto(link_in(auth, desk.daemon.base_url))
    with page.expect_navigation():
        clicked = time.monotonic()
        page.locator("form[method=post] button[type=submit]").click()
    ack, staff = wait_all(
        [
            (desk.mail[OWNER], lambda r: from_desk(r) and r.uid != auth.uid),
            (desk.staff, verdict("authorized", number)),
        ],
        timeout=CLICK_TO_MAILBOX_SECONDS + 0.5,
    )
    assert ack.seen_at - clicked <= CLICK_TO_MAILBOX_SECONDS
    assert staff.seen_at - clicked <= CLICK_TO_MAILBOX_SECONDS


def test_the_authorization_request_carries_no_code(desk: Desk) -> None:
    _, auth, _ = open_authorization(desk, "Problem z pocztą")
    assert tag_of(auth.subject)[1] is None, auth.subject
    assert not re.search(r"\[IQ\.pl#\d+:[0-9a-f]{20}\]", auth.raw.decode("utf-8", "replace"))


def test_a_reply_to_the_authorization_request_authorizes_nothing(desk: Desk) -> None:
    number, auth, _ = open_authorization(desk, "Problem z pocztą")
    reply = new_mail(OWNER, f"Re: {auth.subject}", body="Dostałem link, ale nie klikam.\n")
    reply["In-Reply-To"] = str(auth.msg["Message-ID"])
    desk.send(reply)
    staff = desk.staff.wait_for(copy_of(reply))[0]
    assert staff.header("X-IQ-Authorization") != "authorized"
    assert desk.daemon.ticket(number)["authorization"] == "pending"
