"""Delivery status notifications: filed under their ticket, and they suppress
further automatic mail to an address that failed for good."""

from __future__ import annotations

from sqlalchemy import select

from iqmaild.storage.models import AuditEvent, Suppression
from tests.harness import DESK, STAFF, Harness


def _dsn(our_message_id: str, failed: str, status: str = "5.1.1") -> bytes:
    return (
        "From: MAILER-DAEMON@mx.acme.test (Mail Delivery System)\r\n"
        f"To: {DESK}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-1@mx.acme.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.acme.test\r\n\r\n"
        f"Final-Recipient: rfc822; {failed}\r\nAction: failed\r\nStatus: {status}\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
        "\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {DESK}\r\nTo: {failed}\r\nMessage-ID: {our_message_id}\r\n"
        "Subject: Re: something\r\n"
        "\r\n--B--\r\n"
    ).encode()


async def test_a_bounce_is_filed_under_its_ticket_and_suppresses_automatic_mail(
    desk: Harness,
) -> None:
    await desk.send(subject="Pierwsze")
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == ["owner@acme.test"])

    code, _ = await desk.send_raw(_dsn(auth["Message-ID"], "owner@acme.test"), mail_from="")
    assert code == 250
    await desk.drain()
    row = await desk.last_message()
    assert row.decision == "ignored" and "bounce" in row.reasons
    assert row.ticket_id == (await desk.ticket(1000)).id  # found by our signed Message-ID
    assert [m.envelope_to for m in desk.new_mail()] == [[STAFF]]  # never answered
    async with desk.db.read() as session:
        suppression = await session.get(Suppression, "owner@acme.test")
        assert suppression is not None and suppression.reason == "5.1.1"

    # The next message from that address still gets a ticket, but no automatic mail.
    await desk.send(subject="Drugie")
    await desk.drain()
    assert (await desk.last_message()).decision == "pending"
    assert [m.envelope_to for m in desk.new_mail()] == [[STAFF]]
    async with desk.db.read() as session:
        events = list(
            await session.scalars(
                select(AuditEvent).where(AuditEvent.event == "autoreply.suppressed")
            )
        )
    assert events and events[-1].data["why"] == "bounced"


async def test_a_temporary_failure_report_suppresses_nothing(desk: Harness) -> None:
    code, _ = await desk.send_raw(
        _dsn("<x@elsewhere.test>", "owner@acme.test", "4.2.2").replace(
            b"Action: failed", b"Action: delayed"
        ),
        mail_from="",
    )
    assert code == 250
    await desk.drain()
    assert (await desk.last_message()).decision == "ignored"
    async with desk.db.read() as session:
        assert await session.get(Suppression, "owner@acme.test") is None


async def test_a_forged_report_cannot_silence_a_customer(desk: Harness) -> None:
    # Not a bounce of ours: an attacker mails a report naming the customer.
    forged = _dsn("<iq.1.0123456789abcdef.0000000000000000@desk.test>", "owner@acme.test")
    assert (await desk.send_raw(forged, mail_from="attacker@evil.test"))[0] == 250
    # Even with a null sender, a report that returns none of our messages counts for nothing.
    assert (await desk.send_raw(forged.replace(b"dsn-1@", b"dsn-2@"), mail_from=""))[0] == 250
    await desk.drain()
    async with desk.db.read() as session:
        assert await session.get(Suppression, "owner@acme.test") is None
    await desk.send(subject="Nadal działa link?")
    await desk.drain()
    assert ["owner@acme.test"] in [m.envelope_to for m in desk.new_mail()]
