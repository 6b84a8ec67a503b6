"""Mail that comes back (DESIGN.md, "Outbound mail and loop protection").

Every outbound mail leaves with a signed envelope sender naming its outbox row.
A report sent there is filed under that row, never answered, copied to staff at
most once per row (never for a staff copy), and only it can suppress automatic
mail. Our own mail arriving as if a customer wrote it is a loop, not a ticket.
"""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from iqmaild.config import ConfigError, parse_config
from iqmaild.storage.models import Message, OutboxItem, Suppression
from tests.harness import DESK, STAFF, Harness, config_dict, link_in, parse

OWNER = "owner@acme.test"


def _dsn(
    returned_headers: str, failed: str, status: str = "5.1.1", action: str = "failed"
) -> bytes:
    return (
        "From: MAILER-DAEMON@mx.acme.test (Mail Delivery System)\r\n"
        f"To: {DESK}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <dsn-{status}-{action}@mx.acme.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n'
        "\r\n--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.acme.test\r\n\r\n"
        f"Final-Recipient: rfc822; {failed}\r\nAction: {action}\r\nStatus: {status}\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n"
        "\r\n--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"{returned_headers}"
        "\r\n--B--\r\n"
    ).encode()


def _returned_part(captured: bytes) -> str:
    """The headers of our mail, as an MTA returns them with RET=HDRS."""
    return captured.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace") + "\r\n"


async def _link_mail(desk: Harness) -> tuple[bytes, str]:
    await desk.send(subject="Pierwsze")
    await desk.drain()
    [captured] = [m for m in desk.relay.messages if m.rcpt_tos == [OWNER]]
    desk.new_mail()
    return captured.content, captured.mail_from


async def test_every_mail_leaves_with_a_signed_envelope_sender_of_its_row(desk: Harness) -> None:
    await _link_mail(desk)
    async with desk.db.read() as session:
        rows = {r.recipient: r.id for r in await session.scalars(select(OutboxItem))}
    senders = {m.rcpt_tos[0]: m.mail_from for m in desk.relay.messages}
    for recipient, row in rows.items():
        local, _, domain = senders[recipient].partition("@")
        assert domain == "desk.test" and local.startswith(f"bok+bounce-{row}-"), senders
    assert len(set(senders.values())) == len(senders)


async def test_a_report_to_our_envelope_sender_is_filed_under_its_row(desk: Harness) -> None:
    content, verp = await _link_mail(desk)
    report = _dsn(_returned_part(content), OWNER)
    assert (await desk.send_raw(report, mail_from="", rcpt=[verp]))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    async with desk.db.read() as session:
        link_row = await session.scalar(select(OutboxItem).where(OutboxItem.recipient == OWNER))
        suppression = await session.get(Suppression, OWNER)
    assert link_row is not None and row.outbox_ref == link_row.id
    assert (row.decision, row.reasons, row.rules_hit[0]) == ("ignored", ["bounce"], "returned_mail")
    assert row.ticket_id == (await desk.ticket(1000)).id
    assert suppression is not None and suppression.reason == "5.1.1"
    assert link_row.reported_at is not None and "returned" in (link_row.last_error or "")
    [staff] = desk.new_mail()  # never answered; staff see it once, marked as returned
    assert staff.envelope_to == [STAFF]
    assert staff["X-IQ-Returned"] == f"outbox {link_row.id} auth_request"
    # The returned link mail burned its link: a returned copy is no proof of anything.
    async with desk.http.get(desk.base_url + link_in(parse(content))) as resp:
        assert resp.status == 410
    # A second report about the same row (another MTA, a retry) is filed, not copied again.
    again = report.replace(b"<dsn-5.1.1-failed@", b"<dsn-again@")
    assert (await desk.send_raw(again, mail_from="", rcpt=[verp]))[0] == 250
    await desk.drain()
    assert desk.new_mail() == []
    assert (await desk.last_message()).outbox_ref == link_row.id

    # The next message from that address still gets a ticket, and staff see the
    # suppressed link on it: nobody is left silently linkless.
    await desk.send(subject="Drugie")
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.suppressed) == ("pending", ["auth_request:bounced"])
    [staff] = desk.new_mail()
    assert staff.envelope_to == [STAFF] and staff["X-IQ-Suppressed"] == "auth_request:bounced"


async def test_a_delay_warning_suppresses_and_burns_nothing(desk: Harness) -> None:
    content, verp = await _link_mail(desk)
    report = _dsn(_returned_part(content), OWNER, "4.4.1", "delayed")
    assert (await desk.send_raw(report, mail_from="", rcpt=[verp]))[0] == 250
    await desk.drain()
    assert (await desk.last_message()).decision == "ignored"
    async with desk.db.read() as session:
        assert await session.get(Suppression, OWNER) is None
    async with desk.http.get(desk.base_url + link_in(parse(content))) as resp:
        assert resp.status == 200


async def test_a_report_naming_our_message_id_but_not_our_envelope_suppresses_nothing(
    desk: Harness,
) -> None:
    """Our Message-IDs travel in References: anyone can quote one (a forged bounce)."""
    content, _ = await _link_mail(desk)
    forged = _dsn(_returned_part(content), OWNER)
    assert (await desk.send_raw(forged, mail_from="attacker@evil.test"))[0] == 250
    assert (await desk.send_raw(forged.replace(b"<dsn-", b"<dsn2-"), mail_from=""))[0] == 250
    await desk.drain()
    async with desk.db.read() as session:
        assert await session.get(Suppression, OWNER) is None
    await desk.send(subject="Nadal działa link?")
    await desk.drain()
    assert [OWNER] in [m.envelope_to for m in desk.new_mail()]


async def test_a_forged_envelope_sender_is_refused_at_rcpt(desk: Harness) -> None:
    _, verp = await _link_mail(desk)
    local, _, domain = verp.partition("@")
    row, sig = local.rsplit("-", 2)[1:]
    for forged in (
        f"bok+bounce-{int(row) + 1}-{sig}@{domain}",  # another row, same signature
        f"bok+bounce-{row}-{'0' * 12}@{domain}",
    ):
        code, _ = await desk.send_raw(_dsn("", OWNER), mail_from="", rcpt=[forged])
        assert code == 550


async def test_a_bouncing_staff_mailbox_stops_by_itself(desk: Harness) -> None:
    """The staff mailbox rejects after the relay accepted: its bounce never makes another copy."""
    await desk.send(subject="Pętla?")
    await desk.drain()
    for _ in range(5):  # each round: every staff copy the relay took comes back as a bounce
        staff = [m for m in desk.relay.messages[desk.seen :] if m.rcpt_tos == [STAFF]]
        desk.new_mail()
        if not staff:
            break
        for copy in staff:
            report = _dsn(_returned_part(copy.content), STAFF)
            assert (await desk.send_raw(report, mail_from="", rcpt=[copy.mail_from]))[0] == 250
        await desk.drain()
    async with desk.db.read() as session:
        messages = await session.scalar(select(func.count(Message.id)))
        staff_rows = await session.scalar(
            select(func.count(OutboxItem.id)).where(OutboxItem.kind == "staff")
        )
    assert (messages, staff_rows) == (2, 1)  # the mail and one bounce; one copy in all


async def test_our_own_mail_coming_back_is_a_loop_not_a_ticket(desk: Harness) -> None:
    """A routing mistake (staff mailbox forwarding to the desk) returns our staff copy."""
    await desk.send(subject="Wraca?")
    await desk.drain()
    copies = {m.rcpt_tos[0]: m.content for m in desk.relay.messages}
    desk.new_mail()
    for returned in (copies[STAFF], copies[OWNER]):  # the staff copy, and our link mail
        assert (await desk.send_raw(returned, mail_from=STAFF))[0] == 250
        await desk.drain()
        row = await desk.last_message()
        assert (row.decision, row.rules_hit[0]) == ("ignored", "own_mail_returned")
    assert desk.new_mail() == []  # neither answered nor copied again
    async with desk.db.read() as session:
        assert await session.scalar(select(func.count(OutboxItem.id))) == 2


async def test_a_routing_loop_stops_at_the_hop_limit(desk: Harness) -> None:
    hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; x\r\n" for i in range(31))
    raw = (
        f"{hops}From: {OWNER}\r\nTo: {DESK}\r\nSubject: loop\r\n"
        "Message-ID: <hops@client.test>\r\n\r\nx\r\n"
    ).encode()
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.rules_hit, row.ticket_id) == ("ignored", ["hop_limit"], None)
    assert desk.new_mail() == []


@pytest.mark.parametrize("staff", [DESK, "BOK@desk.test", "bok+staff@desk.test"])
def test_a_staff_address_that_is_a_desk_address_is_refused(staff: str) -> None:
    data = config_dict("sqlite+aiosqlite:///x.db", 25)
    data["outbound"]["staff_address"] = staff
    with pytest.raises(ConfigError, match="staff_address: is a desk address"):
        parse_config(data)


@pytest.mark.parametrize(
    "reply",
    [
        "vacation",  # an old vacation(1) answers the envelope sender, ignores Auto-Submitted
        "delivered",  # a success notification
    ],
)
async def test_mail_to_our_envelope_sender_that_is_no_failure_suppresses_nothing(
    desk: Harness, reply: str
) -> None:
    content, verp = await _link_mail(desk)
    if reply == "vacation":
        raw = (
            f"From: {OWNER}\r\nTo: {verp}\r\nSubject: Urlop\r\n"
            "Message-ID: <vacation@acme.test>\r\n\r\nJestem na urlopie.\r\n"
        ).encode()
        sender = OWNER
    else:
        raw = _dsn(_returned_part(content), OWNER, "2.0.0", "delivered")
        sender = ""
    assert (await desk.send_raw(raw, mail_from=sender, rcpt=[verp]))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert row.decision == "ignored" and row.outbox_ref is not None
    async with desk.db.read() as session:
        assert await session.get(Suppression, OWNER) is None
    async with desk.http.get(desk.base_url + link_in(parse(content))) as resp:
        assert resp.status == 200  # the owner can still click


async def test_a_refusals_return_address_files_nothing_under_the_ticket(desk: Harness) -> None:
    """A stranger who guessed a ticket number gets a refusal; its return address must not
    let them file messages under that ticket."""
    number = await desk.authorized_ticket()
    await desk.send(sender="anna@nieznana-firma.test", subject=f"Re: [IQ.pl#{number}] hej")
    await desk.drain()
    [refusal] = [m for m in desk.relay.messages if m.rcpt_tos == ["anna@nieznana-firma.test"]]
    desk.new_mail()
    raw = (
        f"From: anna@nieznana-firma.test\r\nTo: {refusal.mail_from}\r\nSubject: x\r\n"
        "Message-ID: <hidden@nieznana-firma.test>\r\n\r\nukryte\r\n"
    ).encode()
    assert (await desk.send_raw(raw, "anna@nieznana-firma.test", [refusal.mail_from]))[0] == 250
    await desk.drain()
    assert (await desk.last_message()).ticket_id is None


async def test_our_staff_copy_back_without_our_marks_is_a_loop(desk: Harness) -> None:
    """A forwarder that strips X-* headers returns the staff copy: no new ticket, no loop."""
    await desk.send(subject="Przez forwarder")
    await desk.drain()
    [copy] = [m.content for m in desk.relay.messages if m.rcpt_tos == [STAFF]]
    desk.new_mail()
    stripped = b"".join(
        line
        for line in copy.split(b"\r\n\r\n", 1)[0].splitlines(keepends=True)
        if not line.lower().startswith(b"x-iq-")
    )
    forwarded = b"Received: from forwarder.test by mx.desk.test; x\r\n" + stripped
    forwarded += b"\r\n\r\n" + copy.split(b"\r\n\r\n", 1)[1]
    assert (await desk.send_raw(forwarded, mail_from=OWNER))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    # The copy's Message-ID is ours and signed (a staff copy has its own): our mail.
    assert (row.decision, row.rules_hit, row.ticket_id) == ("ignored", ["own_mail_returned"], None)
    assert desk.new_mail() == []
