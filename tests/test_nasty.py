"""Every scenario mail of tests/data against a real daemon (tests/data/README.md).

One fresh desk per case: ticket 1000 is created first with a clean mail from the
primary address and authorized with its link (so its code is out, as in real
life), then the case's bytes go in over real SMTP, unnormalised and
dot-stuffed by smtplib. Besides the expected verdict, every case checks what left
the desk: no injected header, one verdict per staff copy, no code to strangers,
nothing but the staff copy for a loop signal.
"""

from __future__ import annotations

import re
import tomllib
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select

from iqmaild.core.vocabulary import Decision, Reason
from iqmaild.storage.models import Message, OutboxItem, Ticket
from tests.harness import DATA, DESK, STAFF, Harness, link_in, parse

CASES: list[dict[str, Any]] = tomllib.loads((DATA / "expectations.toml").read_text("utf-8"))["case"]
OVERSIZE = "GENERATED_OVERSIZE"
PLACEHOLDER = b"{{CODE1000}}"
# smtplib and aiosmtpd do not hand these back byte-exact (tests/data/README.md).
NOT_BYTE_EXACT = frozenset({"nasty_lf_only.eml", "nasty_smtp_smuggling.eml"})
VERDICT_VALUE = re.compile(r"^[A-Za-z0-9_.@+-]+(?:,[A-Za-z0-9_.@+-]+)*$")
VERDICT_HEADERS = ("x-iq-ticket", "x-iq-authorization", "x-iq-reasons", "x-iq-account")
# Headers our own customer mail may carry; anything else came from somewhere else.
CUSTOMER_MAIL_HEADERS = frozenset(
    {
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "thread-index",
        "thread-topic",
        "auto-submitted",
        "x-auto-response-suppress",
        "x-iq-loop",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
# Names the case files try to smuggle in as headers (folded Subject, encoded CR LF).
INJECTED = re.compile(rb"^(?:bcc|x-injected)[ \t]*:", re.IGNORECASE)
# Reasons saying the sender may not authorize: it must never receive a ticket's code.
NOT_ELIGIBLE = frozenset(
    {
        Reason.UNKNOWN_SENDER,
        Reason.TECHNICAL_ADDRESS,
        Reason.ADDITIONAL_ADDRESS,
        Reason.MALFORMED_SENDER,
    }
)


def test_manifest_matches_the_files() -> None:
    files = {c["file"] for c in CASES} - {OVERSIZE}
    assert len(files) == len(CASES) - 1, "one [[case]] per file"
    assert files == {p.name for p in DATA.glob("*.eml")}
    decisions = {d.value for d in Decision}
    reasons = {r.value for r in Reason}
    for case in CASES:
        if case["smtp_code"] == 250:
            assert case["decision"] in decisions, case["file"]
        else:
            assert "decision" not in case and case["ticket"] == "none", case["file"]
        assert set(case["reasons"]) <= reasons, case["file"]
        assert case["ticket"] in ("new", "none") or case["ticket"].startswith("existing:")


def oversize_message() -> bytes:
    """A well-formed mail from the primary, a little over the 1 MiB limit."""
    head = (
        b"From: owner@acme.test\r\nTo: bok@desk.test\r\nSubject: Duzy zalacznik\r\n"
        b"Date: Wed, 25 Nov 2026 10:00:00 +0100\r\nMessage-ID: <oversize@client.test>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    line = b"x" * 76 + b"\r\n"
    raw = head + line * ((1024 * 1024 - len(head)) // len(line) + 2)
    assert 1024 * 1024 < len(raw) < 1024 * 1024 + 1024
    return raw


def as_received(raw: bytes) -> bytes:
    """What smtplib + aiosmtpd deliver for ``raw``: smtplib stuffs a dot after any LF
    and ends the data with CRLF; aiosmtpd un-stuffs only lines that follow a CRLF."""
    wire = re.sub(rb"(?m)^\.", b"..", raw)
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def header_lines(content: bytes) -> list[bytes]:
    """The physical lines of the header section, split the way the email package does."""
    out = []
    for line in re.split(rb"\r\n|\r|\n", content):
        if not line:
            break
        out.append(line)
    return out


def names(msg: EmailMessage) -> list[str]:
    return [k.lower() for k in msg]


def envelope(mail: EmailMessage) -> list[str]:
    return list(mail.envelope_to)  # type: ignore[attr-defined]


async def count(desk: Harness, model: type) -> int:
    async with desk.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def outbox_after(desk: Harness, last_id: int) -> list[OutboxItem]:
    async with desk.db.read() as session:
        rows = await session.scalars(
            select(OutboxItem).where(OutboxItem.id > last_id).order_by(OutboxItem.id)
        )
        return list(rows)


def check_no_injection(captured: list[bytes], mails: list[EmailMessage]) -> None:
    for content, mail in zip(captured, mails, strict=True):
        offending = [line for line in header_lines(content) if INJECTED.match(line)]
        assert not offending, offending
        assert "bcc" not in names(mail)
        assert not any(n.startswith("x-injected") for n in names(mail)), names(mail)
        assert envelope(mail) == [STAFF] or STAFF not in envelope(mail)
        assert DESK not in envelope(mail)


def check_staff_copy(copy: EmailMessage, sent: bytes, row: Message, number: int | None) -> None:
    """The message as received under exactly one verdict of ours; forged X-IQ-* gone."""
    ours = [n for n in names(copy) if n.startswith("x-iq-")]
    assert len(ours) == len(set(ours)), ours
    assert set(VERDICT_HEADERS) <= set(ours), ours
    assert copy.get_all("X-IQ-Authorization") == [row.decision]
    assert copy["X-IQ-Ticket"] == (str(number) if number else "none")
    assert str(copy["X-IQ-Reasons"]).split(",") == (row.reasons or ["none"])
    assert copy["X-IQ-Account"] == (row.account_id or "none")
    for name in ours:  # our values are tokens: nothing from the message is glued on
        assert VERDICT_VALUE.match(str(copy[name])), (name, str(copy[name]))
    # The customer's headers as they came, but for the threading fields: the copy
    # has its own Message-ID (ours) and threads under the customer's.
    threading = ("message-id", "in-reply-to", "references")
    received = parse(sent)
    original = [n for n in names(received) if not n.startswith(("x-iq-", *threading))]
    assert [n for n in names(copy) if not n.startswith(("x-iq-", *threading))] == original
    assert len(copy.get_all("Message-ID") or []) == 1
    assert str(copy["Message-ID"]).startswith("<iq."), copy["Message-ID"]
    assert str(copy["Message-ID"]) != str(received["Message-ID"])
    assert len(copy.get_all("In-Reply-To") or []) <= 1
    assert len(copy.get_all("References") or []) <= 1


def check_customer_mail(
    captured: list[bytes], mails: list[EmailMessage], row: Message, codes: list[str]
) -> None:
    """Our headers only, to the From mailbox only, never for a loop, no code to strangers."""
    customer = [(c, m) for c, m in zip(captured, mails, strict=True) if envelope(m) != [STAFF]]
    if row.decision == Decision.IGNORED:
        assert customer == [], [envelope(m) for _, m in customer]
    for content, mail in customer:
        assert set(names(mail)) <= CUSTOMER_MAIL_HEADERS, names(mail)
        assert len(mail.get_all("Subject") or []) == 1
        # To the From only; but a code that reached someone not eligible is replaced,
        # and the new one goes to the owner of the ticket.
        code_changed = "Nowy kod autoryzacyjny" in str(mail["Subject"])
        expected = ["owner@acme.test"] if code_changed else [row.from_address]
        assert envelope(mail) == expected, (envelope(mail), row.from_address)
        if NOT_ELIGIBLE & set(row.reasons):
            assert not [c for c in codes if c.encode() in content], "code sent to a stranger"
        # A new ticket is never authorized by mail: its code is never mailed.
        assert not [c for c in codes[1:] if c.encode() in content], "code of a new ticket"
    if row.decision == Decision.PENDING:
        links = [m for _, m in customer if "/authorize/" in m.as_string()]
        assert len(links) == 1, [envelope(m) for _, m in customer]


async def check_staff_delivery(
    desk: Harness,
    mails: list[EmailMessage],
    last_outbox_id: int,
    sent: bytes,
    row: Message,
    number: int | None,
) -> None:
    """One staff copy queued for the message, delivered, and everything else delivered."""
    outbox = await outbox_after(desk, last_outbox_id)
    # A follow-up with the code that authorizes ticket 1000 also re-delivers its
    # pending first message to staff, as authorized; that copy is not this case's.
    staff_rows = [item for item in outbox if item.kind == "staff" and item.message_id == row.id]
    assert len(staff_rows) == 1, [(item.kind, item.recipient) for item in outbox]
    assert staff_rows[0].recipient == STAFF and staff_rows[0].message_id == row.id
    # Sent mail is blanked: the copy (and any code in it) exists only where it went.
    assert {item.content for item in outbox if item.state == "sent"} <= {b""}
    undelivered = [(i.kind, i.state, i.last_error) for i in outbox if i.state != "sent"]
    assert not undelivered, undelivered
    staff = [m for m in mails if envelope(m) == [STAFF] and m["X-IQ-Message"] == str(row.id)]
    assert len(staff) == 1, [envelope(m) for m in mails]
    check_staff_copy(staff[0], sent, row, number)


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
async def test_case(desk: Harness, case: dict[str, Any]) -> None:
    await desk.send(subject="Problem z pocztą", body="Dzień dobry,\nnie działa poczta.\n")
    await desk.drain()
    link = next(m for m in desk.new_mail() if envelope(m) == ["owner@acme.test"])
    async with desk.http.post(desk.base_url + link_in(link)) as resp:
        assert resp.status == 200
    await desk.drain()
    first = await desk.ticket(1000)
    assert first.authorization == "authorized"
    code1000 = await desk.code(1000)
    before = await desk.last_message()
    outbox_before = [item.id for item in await outbox_after(desk, 0)]
    desk.new_mail()

    if case["file"] == OVERSIZE:
        raw = oversize_message()
    else:
        raw = (DATA / case["file"]).read_bytes()
        assert raw.count(PLACEHOLDER) <= 1
        raw = raw.replace(PLACEHOLDER, code1000.encode())

    code, text = await desk.send_raw(raw, case["mail_from"], case["rcpt"])
    assert code == case["smtp_code"], text
    await desk.drain()
    start = desk.seen
    mails = desk.new_mail()
    captured = [m.content for m in desk.relay.messages[start:]]
    check_no_injection(captured, mails)

    if code != 250:
        assert (await desk.last_message()).id == before.id, "a rejected message was stored"
        assert await count(desk, Message) == 1
        assert await count(desk, Ticket) == 1
        assert mails == []
        return

    # Stored once, byte-exact, and processed.
    assert await count(desk, Message) == 2, "one message in, one row (no smuggled second)"
    row = await desk.last_message()
    assert row.state == "processed", (row.state, row.last_error)
    assert row.raw == as_received(raw)
    assert (row.raw == raw) is (case["file"] not in NOT_BYTE_EXACT)
    assert row.rcpt_to == case["rcpt"]

    # The verdict.
    assert row.decision == case["decision"], (row.decision, row.reasons)
    assert set(case["reasons"]) <= set(row.reasons), row.reasons
    assert set(row.reasons) <= {r.value for r in Reason}

    # The ticket.
    codes = [code1000]
    number: int | None = None
    expected = case["ticket"]
    if expected == "none":
        assert row.ticket_id is None
        assert await count(desk, Ticket) == 1
    elif expected == "new":
        assert row.ticket_id not in (None, first.id)
        assert await count(desk, Ticket) == 2
        async with desk.db.read() as session:
            ticket = await session.get(Ticket, row.ticket_id)
            assert ticket is not None
            number = ticket.number
        codes.append(await desk.code(number))
    else:
        number = int(expected.removeprefix("existing:"))
        assert row.ticket_id == (await desk.ticket(number)).id
        assert await count(desk, Ticket) == 1

    # What left the desk.
    check_customer_mail(captured, mails, row, codes)
    await check_staff_delivery(desk, mails, max(outbox_before), raw, row, number)


async def test_raw_latin2_headers_are_read_in_the_declared_charset(desk: Harness) -> None:
    """Unencoded ISO-8859-2 headers (Outlook Express) stay readable for staff and customer."""
    raw = (DATA / "nasty_8bit_latin2_headers.eml").read_bytes()
    assert (await desk.send_raw(raw, "owner@acme.test"))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    subject = "Błąd certyfikatu SSL - proszę o pomoc, Łódź"
    assert (row.subject, row.headers["from"]) == (subject, "Jan Łukasz Kowalski <owner@acme.test>")
    assert (await desk.ticket(1000)).subject == subject
    link = next(m for m in desk.new_mail() if envelope(m) == ["owner@acme.test"])
    assert subject in str(link["Subject"])
