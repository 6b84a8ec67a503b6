"""The full customer story over real SMTP and HTTP (DESIGN.md, issue 2)."""

from __future__ import annotations

from email.header import Header

from sqlalchemy import select

from iqmaild.storage.models import AuthToken, Message
from tests.harness import DESK, STAFF, Harness, link_in


async def test_primary_address_story(any_desk: Harness) -> None:
    desk = any_desk
    # 1. A new mail from the primary address: pending, link to the sender, staff copy.
    await desk.send(subject="Problem z pocztą")
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons, row.sender_role) == ("pending", [], "primary")
    ticket = await desk.ticket(1000)
    assert ticket.authorization == "pending"
    tag = await desk.tag(1000)

    mails = desk.new_mail()
    by_rcpt = {m.envelope_to[0]: m for m in mails}
    assert set(by_rcpt) == {"owner@acme.test", STAFF}
    auth = by_rcpt["owner@acme.test"]
    # The link mail names the ticket without its code: an auto-reply to it (or the
    # owner replying instead of clicking) can carry nothing that authorizes.
    assert str(auth["Subject"]).count("[IQ.pl#1000]") == 1
    assert (await desk.code(1000)) not in auth.as_string()
    assert "Problem z pocztą" in str(auth["Subject"])
    assert auth["Auto-Submitted"] == "auto-replied"
    assert auth["In-Reply-To"]
    staff = by_rcpt[STAFF]
    assert staff["X-IQ-Authorization"] == "pending"
    assert staff["X-IQ-Ticket"] == "1000"

    # 2. GET shows the page and authorizes nothing (scanners pre-fetch links).
    path = link_in(auth)
    async with desk.http.get(desk.base_url + path) as resp:
        page = await resp.text()
        assert resp.status == 200
    assert "1000" in page and "<form" in page and 'method="post"' in page
    assert (await desk.ticket(1000)).authorization == "pending"
    async with desk.db.read() as session:
        token = await session.scalar(select(AuthToken))
        assert token is not None and token.used_at is None
        assert path.rsplit("/", 1)[1] not in token.token_hash  # only the hash is stored

    # 3. POST authorizes: staff get the message again as authorized, customer an ack.
    async with desk.http.post(desk.base_url + path) as resp:
        assert resp.status == 200
    assert (await desk.ticket(1000)).authorization == "authorized"
    await desk.drain()
    mails = desk.new_mail()
    kinds = {(m.envelope_to[0], m["X-IQ-Authorization"]) for m in mails}
    assert (STAFF, "authorized") in kinds
    ack = next(m for m in mails if m.envelope_to[0] == "owner@acme.test")
    assert str(ack["Subject"]).count(tag) == 1  # the code goes out first here
    assert ack["In-Reply-To"] == auth["In-Reply-To"]  # threads under the customer's mail
    async with desk.db.read() as session:
        row = await session.get(Message, row.id)
        assert row is not None and row.decision == "authorized"

    # A second POST (double click) changes nothing and says the link is used.
    async with desk.http.post(desk.base_url + path) as resp:
        assert resp.status == 410

    # 4. The customer answers from Outlook: "RE: Odp:" and a folded encoded subject.
    subject = Header(f"RE: Odp: {tag} Problem z pocztą – dalej nie działa", "utf-8").encode(
        maxlinelen=40
    )
    assert "\n" in subject or "=?" in subject
    await desk.send(subject=subject, headers={"Thread-Index": "AdnBzX4kLw5Oq1ZzS3mFwH2uYxk3nQ=="})
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons) == ("authorized", [])
    assert row.ticket_id == ticket.id
    staff_copy = desk.new_mail()
    assert [m["X-IQ-Authorization"] for m in staff_copy] == ["authorized"]
    assert staff_copy[0].envelope_to == [STAFF]


async def test_reply_without_subject_tag_is_filed_by_reference(any_desk: Harness) -> None:
    desk = any_desk
    await desk.send(subject="Faktura")
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to[0] == "owner@acme.test")
    our_id = auth["Message-ID"]
    # A client that rewrote the subject, but kept In-Reply-To.
    await desk.send(subject="Odp: Faktura", headers={"In-Reply-To": our_id, "References": our_id})
    await desk.drain()
    row = await desk.last_message()
    first = await desk.ticket(1000)
    assert row.ticket_id == first.id
    assert (row.decision, row.reasons) == ("unauthorized", ["code_missing"])
    notice = next(m for m in desk.new_mail() if m.envelope_to[0] == "owner@acme.test")
    # Still pending: the owner may hear of their ticket, but its code only after the click.
    assert "[IQ.pl#1000]" in str(notice["Subject"])
    assert await desk.code(1000) not in notice.as_string()
    assert DESK in str(notice["From"])
    assert (await desk.ticket(1000)).authorization == "pending"

    async with desk.http.post(desk.base_url + link_in(auth)) as resp:
        assert resp.status == 200
    await desk.drain()
    desk.new_mail()
    await desk.send(subject="Odp: Faktura", headers={"In-Reply-To": our_id, "References": our_id})
    await desk.drain()
    notice = next(m for m in desk.new_mail() if m.envelope_to[0] == "owner@acme.test")
    assert await desk.tag(1000) in str(notice["Subject"])  # authorized: the owner may have it


async def test_an_auto_responder_cannot_authorize_a_forged_request(any_desk: Harness) -> None:
    """Forged From: owner; the owner's vacation responder (no Auto-Submitted) answers the
    link mail from the owner's address. Nothing it carries authorizes anything."""
    desk = any_desk
    await desk.send(subject="Proszę zmienić hasło", mail_from="attacker@evil.test")
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == ["owner@acme.test"])
    quoted = auth.get_body(preferencelist=("plain",)).get_content()  # type: ignore[union-attr]
    await desk.send(
        subject=f"Re: {auth['Subject']}",
        body="Jestem na urlopie do poniedziałku.\n\n> " + quoted.replace("\n", "\n> "),
        headers={"In-Reply-To": auth["Message-ID"], "References": auth["Message-ID"]},
    )
    await desk.drain()
    reply = await desk.last_message()
    assert reply.ticket_id == (await desk.ticket(1000)).id
    assert (reply.decision, reply.reasons) == ("unauthorized", ["code_missing"])
    assert (await desk.ticket(1000)).authorization == "pending"
    staff = [m["X-IQ-Authorization"] for m in desk.new_mail() if m.envelope_to == [STAFF]]
    assert staff == ["unauthorized"]  # the forged request never reached staff as authorized
    async with desk.db.read() as session:
        first = await session.scalar(select(Message).order_by(Message.id).limit(1))
        assert first is not None and first.decision == "pending"

    # Even the right code, were it known, does not authorize a ticket nobody confirmed.
    await desk.send(subject=f"Re: {await desk.tag(1000)} Proszę zmienić hasło")
    await desk.drain()
    assert (await desk.last_message()).decision == "pending"
    assert (await desk.ticket(1000)).authorization == "pending"
    # The auto-reply quoted the link: a copy of it now sits in our database and in the
    # staff mailbox, so it is spent (a new request gets a new one).
    async with desk.http.get(desk.base_url + link_in(auth)) as resp:
        assert resp.status == 410
