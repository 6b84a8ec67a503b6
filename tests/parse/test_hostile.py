"""Messages built to break the daemon still reach staff with a decision."""

from __future__ import annotations

from tests.harness import DESK, STAFF, Harness


async def test_absurd_mime_nesting_is_classified_not_dead(desk: Harness) -> None:
    depth = 3000  # deep enough for a RecursionError in the stdlib parser
    head = (
        f"From: owner@acme.test\r\nTo: {DESK}\r\nSubject: nest\r\nMIME-Version: 1.0\r\n"
    ).encode()
    parts = b"".join(
        f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n'.encode()
        for i in range(depth)
    )
    raw = head + parts + b"Content-Type: text/plain\r\n\r\nx\r\n"
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    # the rules read the header section, which is sound: the owner's mail waits for
    # the click like any other; the body's structure is the staff's to look at
    assert (row.state, row.decision) == ("processed", "pending")
    assert any(m.rcpt_tos == [STAFF] for m in desk.relay.messages)  # staff still see it
    from iqmaild.parse.message import body_preview, mime_defects

    assert mime_defects(row.raw) == ["ParseFailure:RecursionError"]
    assert body_preview(row.raw) == "(body could not be decoded)"


async def test_an_overlong_from_address_is_malformed_not_dead(any_desk: Harness) -> None:
    desk = any_desk
    local = "a" * 400
    raw = (f"From: {local}@acme.test\r\nTo: {DESK}\r\nSubject: long\r\n\r\nbody\r\n").encode()
    assert (await desk.send_raw(raw, mail_from="x@elsewhere.test"))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.state, row.decision) == ("processed", "unauthorized")
    assert "malformed_sender" in row.reasons
    assert any(m.envelope_to == [STAFF] for m in desk.new_mail())


async def test_a_huge_cc_list_is_parsed_in_bounded_work(desk: Harness) -> None:
    """20,000 Cc addresses (500 KB): address headers are parsed up to 64 KB, so one
    message cannot hold the CPU for minutes; the outcome is still unshared_cc."""
    from iqmaild.parse.message import HEADER_PARSE_LIMIT

    cc = ", ".join(f"user{i}@example{i % 50}.test" for i in range(20000))
    assert len(cc) > 5 * HEADER_PARSE_LIMIT
    raw = (
        f"From: owner@acme.test\r\nTo: {DESK}\r\nCc: {cc}\r\nSubject: many\r\n\r\nx\r\n"
    ).encode()
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons) == ("unauthorized", ["unshared_cc"])


async def test_a_from_too_long_to_parse_whole_is_malformed(desk: Harness) -> None:
    """Cutting a 70 KB From at a comma would leave one clean mailbox: never trust it."""
    junk = "x" * 70_000
    raw = (
        f"From: owner@acme.test, attacker@evil.test ({junk})\r\nTo: {DESK}\r\n"
        "Subject: spoof\r\n\r\nx\r\n"
    ).encode()
    assert (await desk.send_raw(raw, mail_from="attacker@evil.test"))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons) == ("unauthorized", ["malformed_sender"])
    assert all(m.rcpt_tos == [STAFF] for m in desk.relay.messages)  # no link to the owner


async def test_the_admin_marker_counts_after_any_number_of_headers(desk: Harness) -> None:
    """Only the first 200 headers used to be read: the marker after them was missed."""
    junk = "".join(f"X-Filler-{i}: {i}\r\n" for i in range(500))
    raw = (
        f"From: owner@acme.test\r\nTo: {DESK}\r\nSubject: zmiana\r\n{junk}"
        "X-Mailer: IQ.Admin 4.2\r\nMessage-ID: <late-marker@client.test>\r\n\r\nx\r\n"
    ).encode()
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons) == ("unauthorized", ["admin_panel"])
