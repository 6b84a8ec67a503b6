"""What a real Postfix in front of the daemon shows (issue 7, section 1).

One test per finding, each asserting what the daemon should do. Findings the
daemon does not handle yet are marked xfail(strict=True) with the symptom, so
the branch stays green, the defect stays visible, and the fix turns the test
into a pass (strict: an unexpected pass fails until the mark is removed).
"""

from __future__ import annotations

import copy
import smtplib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email import policy
from typing import Any

import pytest

from tests.e2e.conftest import Desk
from tests.e2e.flows import OWNER, confirm_in_browser, from_desk, open_ticket
from tests.e2e.mail import Received, copy_of, link_in, new_mail, verdict
from tests.e2e.servers import wait_until
from tests.harness import DIRECTORY


def from_mailer_daemon(r: Received) -> bool:
    return "MAILER-DAEMON" in r.header("From") or r.msg.get_content_type() == "multipart/report"


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


# -- 5. plus-addressing ------------------------------------------------------------


def test_plus_address_of_the_desk_is_accepted(desk: Desk) -> None:
    msg = new_mail(OWNER, "Faktura za listopad", to="bok+faktury@desk.test")
    desk.send(msg, rcpts=["bok+faktury@desk.test"])

    def outcome() -> str:
        if any(copy_of(msg)(r) for r in desk.staff.poll()):
            return "filed"
        if any(from_mailer_daemon(r) for r in desk.mail[OWNER].poll()):
            return "bounced"
        return ""

    assert wait_until(outcome, 20, "the mail to be filed or bounced") == "filed"
    assert not [d for d in desk.postfix.deliveries() if d["status"] == "bounced"]


# -- 3. UTF-8 local parts ----------------------------------------------------------


def _with_utf8_primary() -> dict[str, Any]:
    directory = copy.deepcopy(DIRECTORY)
    directory["accounts"].append(
        {"id": "lukasz", "primary": "łukasz@acme.test", "name": "Łukasz", "lang": "pl"}
    )
    return directory


def test_utf8_local_part_is_an_address(make_desk: Callable[..., Desk]) -> None:
    desk = make_desk(directory=_with_utf8_primary())
    msg = new_mail("łukasz@acme.test", "Zażółć gęślą jaźń")
    desk.send(msg, mail_from="łukasz@acme.test", smtputf8=True)
    staff = desk.staff.wait_for(copy_of(msg))[0]
    number = int(staff.header("X-IQ-Ticket"))
    stored = desk.daemon.ticket(number)["messages"]
    assert (stored[0]["decision"], stored[0]["reasons"], stored[0]["sender_role"]) == (
        "pending",
        [],
        "primary",
    ), stored
    # Dovecot 2.3's LMTP offers no SMTPUTF8, so the link mail to łukasz@ cannot be
    # delivered here: its bounce comes back to our envelope sender and is filed
    # under the ticket, never answered (what a real UTF-8 mailbox would not need).
    for later in stored[1:]:
        assert later["decision"] == "ignored" and "bounce" in later["reasons"], later


# -- 4. protocol mismatch ----------------------------------------------------------


@pytest.mark.parametrize(
    ("postfix_transport", "listener"),
    [
        pytest.param("lmtp", "smtp"),
        pytest.param("smtp", "lmtp"),
    ],
)
def test_protocol_mismatch_defers_and_says_so(
    make_desk: Callable[..., Desk], postfix_transport: str, listener: str
) -> None:
    desk = make_desk(protocol=postfix_transport, daemon_protocol=listener)
    queue_id = desk.send(new_mail(OWNER, "Pomyłka w konfiguracji"))

    def tried() -> list[dict[str, str]]:
        return [
            d for d in desk.postfix.deliveries(desk.daemon.smtp_port) if d["queue_id"] == queue_id
        ]

    attempt = wait_until(tried, 20, "Postfix to try the daemon")[0]
    assert attempt["status"] == "deferred", attempt  # 4xx: the mail waits, nothing bounces
    assert any(q["queue_id"] == queue_id for q in desk.postfix.queue())
    time.sleep(0.5)
    assert not any(from_mailer_daemon(r) for r in desk.mail[OWNER].poll())
    errors = [e for e in desk.daemon.events() if e.get("level") in ("error", "critical")]
    assert any("lmtp" in str(e).lower() and "smtp" in str(e).lower() for e in errors), errors


# -- 8. threading --------------------------------------------------------------------


def test_acknowledgement_threads_under_the_customers_message(desk: Desk, page: Any) -> None:
    msg = new_mail(OWNER, "Wątek")
    desk.send(msg)
    auth = desk.mail[OWNER].wait_for(from_desk)[0]
    assert auth.header("In-Reply-To") == msg["Message-ID"]  # the link mail does thread
    confirm_in_browser(page, desk, auth)
    ack = desk.mail[OWNER].wait_for(lambda r: from_desk(r) and r.uid != auth.uid)[0]
    assert ack.header("In-Reply-To") == msg["Message-ID"], ack.raw[:1500]
    assert msg["Message-ID"] in ack.header("References")


def test_pending_and_authorized_staff_copies_have_their_own_message_ids(
    desk: Desk, page: Any
) -> None:
    number, auth, pending = open_ticket(desk, "Dwie kopie")
    confirm_in_browser(page, desk, auth)
    authorized = desk.staff.wait_for(verdict("authorized", number))[0]
    assert authorized.msg["Message-ID"] != pending.msg["Message-ID"]
    customer = auth.header("In-Reply-To")  # what the link mail answers: the customer's id
    ours = [pending, authorized, auth]
    for staff in (pending, authorized):
        # Threaded under the customer's message, with an id of ours of the desk's domain.
        assert staff.header("In-Reply-To") == customer, staff.raw[:1500]
        assert customer in staff.header("References").split()
        assert staff.header("Message-ID").startswith(f"<iq.{number}.")
        assert staff.header("Message-ID").endswith("@desk.test>")
    ack = desk.mail[OWNER].wait_for(lambda r: from_desk(r) and r.uid != auth.uid)[0]
    ours.append(ack)
    assert len({r.header("Message-ID") for r in ours}) == len(ours)
    # Postfix logged each with its own message-id on the way out, too.
    logged = {d["message_id"] for d in desk.postfix.deliveries() if d["to"] == "staff@desk.test"}
    assert {r.header("Message-ID").strip("<>") for r in (pending, authorized)} <= logged


# -- 7. size ----------------------------------------------------------------------------


def test_a_message_near_the_size_limit_still_reaches_staff(
    make_desk: Callable[..., Desk],
) -> None:
    limit = 1_000_000
    desk = make_desk(message_size_limit=limit)
    msg = new_mail(OWNER, "Duży załącznik", body="x\n")
    head, _, _ = msg.as_bytes(policy=policy.SMTP).partition(b"\r\n\r\n")
    line = b"Z" * 76 + b"\r\n"
    # The largest message Postfix's MX takes (its own headers count against the limit).
    size = limit
    while True:
        body = line * ((size - len(head) - 4) // len(line))
        try:
            desk.send(head + b"\r\n\r\n" + body, mail_from=OWNER)
            break
        except AssertionError as exc:
            assert "552" in str(exc), exc
            size -= 100

    def staff_copy() -> bool:
        return any(msg["Message-ID"] in r.raw.decode("ascii", "replace") for r in desk.staff.poll())

    def given_up() -> list[dict[str, Any]]:
        return [r for r in desk.daemon.outbox() if r["kind"] == "staff" and r["state"] == "failed"]

    wait_until(lambda: staff_copy() or given_up(), 30, "the staff copy", interval=0.3)
    assert not given_up(), given_up()
    assert staff_copy()


# -- 1. mail that comes back --------------------------------------------------------------


def test_a_bouncing_staff_mailbox_does_not_loop(make_desk: Callable[..., Desk]) -> None:
    # Postfix accepts the staff address, the mailbox behind it does not exist: every
    # staff copy bounces asynchronously, back to the desk's envelope sender.
    desk = make_desk(
        extra_recipients=("gone-staff@desk.test",),
        outbound={"staff_address": "gone-staff@desk.test"},
    )
    desk.send(new_mail(OWNER, "Pętla"))

    def bounced() -> bool:
        return any(d["status"] == "bounced" for d in desk.postfix.deliveries())

    wait_until(bounced, 20, "the staff copy to bounce")
    # A loop grows by dozens of messages a second; a bounded exchange stops.
    counts = []
    for _ in range(8):
        time.sleep(1.0)
        counts.append(len(desk.daemon.messages()))
        assert counts[-1] <= 4, f"messages stored, second by second: {counts}"
    assert counts[-1] == counts[-4], f"still receiving: {counts}"
    wait_until(lambda: not desk.postfix.queue(), 20, "Postfix's queue to empty")


# -- 6. bounces carry live links ------------------------------------------------------------


def _with_ghost_primary() -> dict[str, Any]:
    directory = copy.deepcopy(DIRECTORY)
    directory["accounts"].append({"id": "ghost", "primary": "ghost@acme.test", "name": "Ghost"})
    return directory


def test_a_bounced_link_mail_does_not_carry_a_live_link(make_desk: Callable[..., Desk]) -> None:
    desk = make_desk(directory=_with_ghost_primary())
    msg = new_mail("ghost@acme.test", "Konto bez skrzynki")
    desk.send(msg)
    pending = desk.staff.wait_for(verdict("pending"))[0]
    number = int(pending.header("X-IQ-Ticket"))
    # The DSN about the link mail comes back to the desk and, as every message, to staff.
    dsn = desk.staff.wait_for(lambda r: r.header("X-IQ-Authorization") == "ignored", timeout=30)[0]
    assert dsn.header("X-IQ-Ticket") == str(number)  # filed under the ticket it concerns
    if "/authorize/" in dsn.all_text():
        url = link_in(dsn, desk.daemon.base_url)
        assert http_status(url) in (404, 410), "a live link came back in the bounce"


# -- 9. the README's Postfix recipe -----------------------------------------------------------


def test_a_desk_domain_in_mydestination_refuses_the_desk(make_desk: Callable[..., Desk]) -> None:
    """Why the README makes the desk domain a relay domain: as a local domain (Debian's
    default local_recipient_maps) Postfix refuses the desk before any transport entry."""
    desk = make_desk(
        start_daemon=False,
        postfix_main={
            "mydestination": "desk.test",
            "relay_domains": "",
            "local_recipient_maps": "proxy:unix:passwd.byname $alias_maps",
        },
    )
    with smtplib.SMTP("127.0.0.1", desk.postfix.mx_port, timeout=30) as client:
        client.ehlo("mail.customer.test")
        assert client.mail(OWNER)[0] == 250
        code, text = client.rcpt("bok@desk.test")
    assert code == 550, (code, text)
    assert b"User unknown in local recipient table" in text, text
