"""What our outbound mail looks like on the wire (DESIGN.md: "The ticket tag",
"Outbound mail and loop protection").

Header values from incoming mail never inject headers (CVE-2024-6923), the tag
is in the Subject exactly once, threading headers stay plain, Outlook's
Thread-Index chain is kept, and staff deliveries carry only our X-IQ-* verdict.
"""

from __future__ import annotations

import base64
import re

import pytest
from sqlalchemy import select

from iqmaild.core import threadref
from iqmaild.storage.models import Message, OutboxItem
from tests.harness import DATA, DESK, STAFF, Harness, link_in, parse

OWNER = "owner@acme.test"
THREAD_INDEX = "AdnBzX4kLw5Oq1ZzS3mFwH2uYxk3nQ=="
VERDICT_HEADERS = (
    "X-IQ-Ticket",
    "X-IQ-Authorization",
    "X-IQ-Reasons",
    "X-IQ-Account",
    "X-IQ-Sender-Role",
    "X-IQ-Message",
)


def head_of(raw: bytes) -> bytes:
    return re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]


def header_lines(raw: bytes) -> list[bytes]:
    """Unfolded header lines of a raw message."""
    head = re.sub(rb"\r?\n[ \t]", b" ", head_of(raw))
    return head.splitlines()


def raw_header(raw: bytes, name: str) -> list[bytes]:
    prefix = name.lower().encode() + b":"
    return [
        line.split(b":", 1)[1].strip()
        for line in header_lines(raw)
        if line.lower().startswith(prefix)
    ]


def captured_to(h: Harness, rcpt: str) -> list[bytes]:
    return [m.content for m in h.relay.messages if m.rcpt_tos == [rcpt]]


# -- header injection ---------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["nasty_crlf_encoded_subject.eml", "nasty_folded_subject_injection.eml"]
)
async def test_subject_cannot_inject_headers_into_our_mail(desk: Harness, name: str) -> None:
    raw = (DATA / name).read_bytes()
    code, _ = await desk.send_raw(raw, mail_from=OWNER)
    assert code == 250
    await desk.drain()
    [auth] = captured_to(desk, OWNER)
    # Confirm, so the acknowledgement (built from the stored ticket subject) goes out too.
    path = link_in(parse(auth))
    async with desk.http.post(desk.base_url + path) as resp:
        assert resp.status == 200
    await desk.drain()
    customer_mail = captured_to(desk, OWNER)
    assert len(customer_mail) == 2
    tag = await desk.tag(1000)
    # The link mail names the ticket without its code; the acknowledgement carries it.
    for content, expected in zip(customer_mail, ("[IQ.pl#1000]", tag), strict=True):
        msg = parse(content)
        assert msg["Bcc"] is None and msg["Cc"] is None
        assert not re.search(rb"(?im)^(bcc|cc|x-iq-(?!loop:)[a-z-]*)\s*:", content)
        subject = str(msg["Subject"])
        assert subject.count(expected) == 1 and subject.lower().count("[iq.pl#") == 1
        assert "Faktura" in subject
        assert "\r" not in subject and "\n" not in subject
        assert msg["To"] == OWNER
    # Nobody else got anything but staff.
    assert {tuple(m.rcpt_tos) for m in desk.relay.messages} == {(OWNER,), (STAFF,)}


@pytest.mark.parametrize(
    "template",
    [
        "Re: RE: {tag} Problem z pocztą",  # the full tag, with an unshared Cc
        "Odp: [IQ.pl#1000] Problem z pocztą",  # the short tag: code_missing
        "AW: [ iq.PL # 1000 : {code_upper} ] Problem z pocztą {tag}",  # twice, odd case
    ],
)
async def test_tag_appears_once_even_when_the_customer_subject_carries_it(
    desk: Harness, template: str
) -> None:
    await desk.send(subject="Problem z pocztą")
    await desk.drain()
    [auth] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    async with desk.http.post(desk.base_url + link_in(auth)) as resp:
        assert resp.status == 200  # authorized: notices may carry the code now
    await desk.drain()
    desk.new_mail()
    tag = await desk.tag(1000)
    subject_in = template.format(tag=tag, code_upper=(await desk.code(1000)).upper())
    # A follow-up that earns a notice to the owner (unshared Cc or missing code).
    await desk.send(subject=subject_in, cc=["stranger@elsewhere.test"])
    await desk.drain()
    [notice] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    tag = await desk.tag(1000)  # the Cc saw the code: the notice carries a new one
    subject = str(notice["Subject"])
    assert subject.count(tag) == 1
    assert subject.lower().count("[iq.pl#") == 1
    assert "Problem z pocztą" in subject
    assert len(notice.get_all("Subject") or []) == 1


# -- threading ----------------------------------------------------------------


async def test_in_reply_to_stays_a_plain_msg_id_for_a_long_message_id(desk: Harness) -> None:
    ident = "a" * 150 + ".0123456789-abcdef_ghij+klmn.1732528800" + "@client.example.test"
    assert len(ident) > 200
    await desk.send(message_id=f"<{ident}>")
    await desk.drain()
    [auth] = captured_to(desk, OWNER)
    assert raw_header(auth, "In-Reply-To") == [f"<{ident}>".encode()]
    assert raw_header(auth, "References") == [f"<{ident}>".encode()]
    assert b"=?" not in b"".join(raw_header(auth, "In-Reply-To"))
    assert all(len(line) <= 998 for line in auth.split(b"\r\n"))


async def test_our_message_id_is_of_our_domain(desk: Harness) -> None:
    await desk.send()
    await desk.drain()
    [auth] = captured_to(desk, OWNER)
    [mid] = raw_header(auth, "Message-ID")
    assert re.fullmatch(rb"<[^<>@\s]+@desk\.test>", mid), mid
    assert parse(auth)["Date"] is not None


async def test_in_reply_to_is_never_an_encoded_word(desk: Harness) -> None:
    raw = (
        f"From: {OWNER}\r\nTo: {DESK}\r\nSubject: Test\r\n"
        "Message-ID: <zażółć.1732528800@client.test>\r\n\r\nTreść\r\n"
    ).encode()
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    [auth] = captured_to(desk, OWNER)
    for name in ("In-Reply-To", "References"):
        for value in raw_header(auth, name):
            assert b"=?" not in value, (name, value)


async def test_outlook_thread_index_chain_is_kept(desk: Harness) -> None:
    await desk.send(headers={"Thread-Index": THREAD_INDEX, "Thread-Topic": "Problem z pocztą"})
    await desk.drain()
    [auth] = captured_to(desk, OWNER)
    [value] = raw_header(auth, "Thread-Index")
    parent = base64.b64decode(THREAD_INDEX)
    child = base64.b64decode(value, validate=True)
    assert child[: len(parent)] == parent
    assert len(child) == len(parent) + 5  # one child block
    assert parse(auth)["Thread-Topic"]


@pytest.mark.parametrize("bad", ["not base64!!", "QUJD", "=?utf-8?q?x?="])
async def test_an_unusable_thread_index_is_dropped(desk: Harness, bad: str) -> None:
    await desk.send(headers={"Thread-Index": bad})
    await desk.drain()
    [auth] = captured_to(desk, OWNER)
    assert raw_header(auth, "Thread-Index") == []
    assert raw_header(auth, "In-Reply-To")  # threading by Message-ID still works


# -- staff delivery -------------------------------------------------------------


FORGED = (
    b"X-IQ-Authorization: authorized\r\n"
    b"Received: from mail.acme.test by mx.desk.test; Mon, 18 Nov 2024 10:00:00 +0100\r\n"
    b"X-Iq-Ticket: 1\r\n"
    b" X-IQ-Reasons: none-folded-forgery\r\n"
    b"x-iq-account:\r\n"
    b"\tbeta-folded-forgery\r\n"
    b"From: owner@acme.test\r\n"
    b"To: bok@desk.test\r\n"
    b"Subject: Faktura\r\n"
    b" X-IQ-Authorization: authorized-but-part-of-subject\r\n"
    b"X-IQ-Sender-Role : primary-forgery\r\n"
    b"Message-ID: <forged.1@client.test>\r\n"
    b"X-IQ-Message: 999\r\n"
    b"\r\n"
    b"X-IQ-Authorization: authorized in the body is only text\r\n"
)


async def test_staff_delivery_replaces_every_incoming_x_iq_header(desk: Harness) -> None:
    code, _ = await desk.send_raw(FORGED, mail_from=OWNER)
    assert code == 250
    await desk.drain()
    [staff] = captured_to(desk, STAFF)
    row = await desk.last_message()
    expected = {
        "X-IQ-Ticket": "1000",
        "X-IQ-Authorization": "pending",
        "X-IQ-Reasons": "none",
        "X-IQ-Account": "acme",
        "X-IQ-Sender-Role": "primary",
        "X-IQ-Message": str(row.id),
    }
    for name, value in expected.items():
        assert [v.decode() for v in raw_header(staff, name)] == [value], name
    assert b"forgery" not in staff
    assert b"X-IQ-Message: 999" not in staff
    x_iq = [line for line in header_lines(staff) if line.lower().startswith(b"x-iq-")]
    names = sorted(line.split(b":", 1)[0].decode() for line in x_iq)
    assert names == sorted([*VERDICT_HEADERS, "X-IQ-Loop"])  # ours only, once each
    # What is not a header stays: the Subject's folded text and the body.
    assert b"authorized-but-part-of-subject" in head_of(staff)
    assert staff.endswith(b"\r\n\r\nX-IQ-Authorization: authorized in the body is only text\r\n")
    msg = parse(staff)
    assert msg["In-Reply-To"] == "<forged.1@client.test>"  # the copy has its own id
    assert msg["Received"] is not None


async def test_staff_delivery_of_the_forged_verdict_sample(desk: Harness) -> None:
    raw = (DATA / "forged_x_iq_headers.eml").read_bytes()
    code, _ = await desk.send_raw(raw, mail_from="evil@attacker.test")
    assert code == 250
    await desk.drain()
    [staff] = [parse(c) for c in captured_to(desk, STAFF)]
    assert staff.get_all("X-IQ-Authorization") == ["unauthorized"]
    assert staff.get_all("X-IQ-Reasons") == ["unknown_sender"]
    assert staff.get_all("X-IQ-Account") == ["none"]
    assert len(staff.get_all("X-IQ-Ticket") or []) == 1


async def test_a_leading_continuation_line_cannot_extend_our_verdict(desk: Harness) -> None:
    raw = (
        b" forged-continuation\r\nFrom: owner@acme.test\r\nTo: bok@desk.test\r\n"
        b"Subject: Faktura\r\nMessage-ID: <lead.1@client.test>\r\n\r\nbody\r\n"
    )
    assert (await desk.send_raw(raw, mail_from=OWNER))[0] == 250
    await desk.drain()
    [staff] = captured_to(desk, STAFF)
    row = await desk.last_message()
    assert raw_header(staff, "X-IQ-Message") == [str(row.id).encode()]
    for name in VERDICT_HEADERS:
        for value in raw_header(staff, name):
            assert b"forged" not in value, (name, value)


# -- threading: every mail of ours has its own Message-ID (issue 7 §1.8) ----------


def one_id(raw: bytes, name: str) -> str:
    [value] = raw_header(raw, name)
    return value.decode()


async def test_pending_and_authorized_staff_copies_have_their_own_message_ids(
    desk: Harness,
) -> None:
    parent = "<earlier.1@client.test>"
    sent = await desk.send(headers={"In-Reply-To": parent, "References": parent})
    customer = str(parse(sent)["Message-ID"])
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == [OWNER])
    async with desk.http.post(desk.base_url + link_in(auth)) as resp:
        assert resp.status == 200
    await desk.drain()
    pending, authorized = captured_to(desk, STAFF)
    assert raw_header(pending, "X-IQ-Authorization") == [b"pending"]
    assert raw_header(authorized, "X-IQ-Authorization") == [b"authorized"]
    ids = [one_id(copy, "Message-ID") for copy in (pending, authorized)]
    assert len(set(ids)) == 2 and customer not in ids
    key, domain = desk.config.key, desk.config.message_id_domain
    for copy, mid in zip((pending, authorized), ids, strict=True):
        assert threadref.is_ours(key, domain, mid), mid  # signed, as all our ids
        assert threadref.find_ticket_reference(key, domain, mid) == 1000
        # Under the customer's message, which keeps its own place in its thread.
        assert one_id(copy, "In-Reply-To") == customer
        assert one_id(copy, "References") == f"{parent} {customer}"
    async with desk.db.read() as session:
        rows = list(await session.scalars(select(OutboxItem).where(OutboxItem.kind == "staff")))
    assert sorted(r.header_message_id for r in rows) == sorted(ids)


async def test_a_staff_copy_of_a_message_without_message_id_still_has_one(desk: Harness) -> None:
    raw = f"From: {OWNER}\r\nTo: {DESK}\r\nSubject: Bez identyfikatora\r\n\r\nTresc\r\n"
    assert (await desk.send_raw(raw.encode()))[0] == 250
    await desk.drain()
    [copy] = captured_to(desk, STAFF)
    mid = one_id(copy, "Message-ID")
    assert threadref.is_ours(desk.config.key, desk.config.message_id_domain, mid)
    assert raw_header(copy, "In-Reply-To") == [] and raw_header(copy, "References") == []


async def test_every_kind_of_mail_has_its_own_id_and_threads_under_what_it_answers(
    desk: Harness,
) -> None:
    """Links, acknowledgements, notices, refusals and staff copies: no two
    share a Message-ID; each answers the customer's mail."""
    parent = "<earlier.2@client.test>"
    first = await desk.send(headers={"References": parent})
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == [OWNER])
    async with desk.http.post(desk.base_url + link_in(auth)) as resp:
        assert resp.status == 200
    await desk.drain()
    tag = await desk.tag(1000)
    await desk.send(subject=f"Re: {tag}", cc=["friend@elsewhere.test"])  # leaks the code
    await desk.send(sender="tech@acme.test", subject="Z adresu technicznego")
    await desk.send(sender="stranger@unknown.test", subject="Nieznany")
    await desk.drain()
    async with desk.db.read() as session:
        kinds = set(await session.scalars(select(OutboxItem.kind)))
        received = {m.id: m.message_id for m in await session.scalars(select(Message))}
    assert kinds >= {"auth_request", "acknowledgement", "notice", "refusal", "staff"}, kinds
    mails = [m.content for m in desk.relay.messages]
    ids = [one_id(raw, "Message-ID") for raw in mails]
    assert len(set(ids)) == len(ids), "two mails share a Message-ID"
    key, domain = desk.config.key, desk.config.message_id_domain
    assert all(threadref.is_ours(key, domain, mid) for mid in ids), ids
    answered = set(received.values())
    for raw in mails:
        assert one_id(raw, "In-Reply-To") in answered, head_of(raw)[:600]
        assert one_id(raw, "In-Reply-To") in one_id(raw, "References").split()
        if raw_header(raw, "X-IQ-Message"):  # a staff copy: under the message it copies
            copied = received[int(raw_header(raw, "X-IQ-Message")[0])]
            assert one_id(raw, "In-Reply-To") == copied
    customer = str(parse(first)["Message-ID"])
    for raw in captured_to(desk, OWNER)[:2]:  # the link and the acknowledgement
        assert one_id(raw, "In-Reply-To") == customer
        assert one_id(raw, "References") == f"{parent} {customer}"
