"""Attack pass: a MIME tree the email package cannot build must not cost the
facts that never needed it.

``Content-Type: text/plain; charset*=utf-16''x`` makes the stdlib's MIME parser
raise (UnicodeDecodeError decoding the RFC 2231 parameter) whenever the tree is
built, and the rebuilt parser builds it for any base64 part or report. The whole
message then became "unparsable": no envelope facts either, so a delivery
report to our signed return address was no report; a staff copy that the staff
mailbox bounced came back as new mail and got a staff copy of its own (the loop
of issue 5, item 2), a link forwarded in such a mail stayed live, and the owner's
own mail was malformed.
"""

from __future__ import annotations

import base64

import pytest
from sqlalchemy import select

from iqmaild.storage.models import OutboxItem
from tests.harness import DESK, STAFF, Harness, link_in

OWNER = "owner@acme.test"
POISON = "Content-Type: text/plain; charset*=utf-16''x\r\nContent-Transfer-Encoding: base64\r\n"


def _customer_mail(ident: str, body: str = "UHJvc3plIG8gcG9tb2M=") -> bytes:
    return (
        f"From: {OWNER}\r\nTo: {DESK}\r\nSubject: Pomoc\r\nMessage-ID: <{ident}@client.test>\r\n"
        f"MIME-Version: 1.0\r\n{POISON}\r\n{body}\r\n"
    ).encode()


async def test_the_owners_mail_is_read_from_its_headers(desk: Harness) -> None:
    assert (await desk.send_raw(_customer_mail("poison")))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons) == ("pending", []), row.reasons


async def test_a_bounced_staff_copy_is_a_report_not_new_mail(desk: Harness) -> None:
    assert (await desk.send_raw(_customer_mail("poison-loop")))[0] == 250
    await desk.drain()
    [staff] = [m for m in desk.relay.messages if m.rcpt_tos == [STAFF]]
    sent = len(desk.relay.messages)  # (the test's own email parser cannot read them)
    bounce = (
        (
            "From: MAILER-DAEMON@mx.staff.test (Mail Delivery System)\r\n"
            f"To: {staff.mail_from}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
            "Message-ID: <bounce-1@mx.staff.test>\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
            "--B\r\nContent-Type: text/plain\r\n\r\nRejected by content policy.\r\n"
            "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.staff.test\r\n"
            f"\r\nFinal-Recipient: rfc822; {STAFF}\r\nAction: failed\r\nStatus: 5.7.1\r\n\r\n"
            "--B\r\nContent-Type: message/rfc822\r\n\r\n"
        ).encode()
        + staff.content
        + b"\r\n--B--\r\n"
    )
    assert (await desk.send_raw(bounce, mail_from="", rcpt=[staff.mail_from]))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    async with desk.db.read() as session:
        staff_row = await session.scalar(select(OutboxItem).where(OutboxItem.recipient == STAFF))
    assert staff_row is not None and row.outbox_ref == staff_row.id
    assert (row.decision, row.rules_hit[0]) == ("ignored", "returned_mail")
    assert len(desk.relay.messages) == sent  # a report about a staff copy: never copied


async def test_a_link_forwarded_in_such_a_mail_is_spent(desk: Harness) -> None:
    await desk.send(subject="Zmiana hasla")
    await desk.drain()
    [link_mail] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    path = link_in(link_mail)
    forward = _customer_mail("poison-link", f"Zobaczcie: http://127.0.0.1:8026{path}")
    assert (await desk.send_raw(forward))[0] == 250
    await desk.drain()
    async with desk.http.get(desk.base_url + path) as resp:
        assert resp.status == 410


async def test_a_report_the_parser_gives_up_on_is_still_filed_under_its_row(
    desk: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else makes the parser fail, the envelope needs none: a report to a
    staff copy's return address is still that row's, and is never copied again."""
    await desk.send(subject="Pomoc")
    await desk.drain()
    [staff] = [m for m in desk.relay.messages if m.rcpt_tos == [STAFF]]
    desk.new_mail()

    def broken(*args: object, **kwargs: object) -> None:
        raise RecursionError("a parser failure nobody foresaw")

    monkeypatch.setattr("iqmaild.classify.batch.parse_message", broken)
    bounce = f"From: MAILER-DAEMON@mx.staff.test\r\nTo: {staff.mail_from}\r\n\r\nx\r\n".encode()
    assert (await desk.send_raw(bounce, mail_from="", rcpt=[staff.mail_from]))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.state, row.decision, row.rules_hit[0]) == ("processed", "ignored", "returned_mail")
    assert row.outbox_ref is not None
    assert desk.new_mail() == []


async def test_a_base64_link_in_such_a_mail_is_spent(desk: Harness) -> None:
    await desk.send(subject="Zmiana hasla")
    await desk.drain()
    [link_mail] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    path = link_in(link_mail)
    encoded = base64.encodebytes(f"http://127.0.0.1:8026{path}".encode()).decode()
    forward = (
        f"From: {OWNER}\r\nTo: {DESK}\r\nSubject: Fwd\r\nMessage-ID: <poison-b64@client.test>\r\n"
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        f"--b\r\n{POISON}\r\n{encoded}--b--\r\n"
    ).encode()
    assert (await desk.send_raw(forward))[0] == 250
    await desk.drain()
    async with desk.http.get(desk.base_url + path) as resp:
        assert resp.status == 410
