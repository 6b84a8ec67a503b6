"""Every scenario mail of tests/data against a real daemon (tests/data/README.md).

One fresh desk per case: ticket 1000 is created first with a clean mail from the
primary address, then the case's bytes go in over real SMTP, unnormalised and
dot-stuffed by smtplib. Besides the expected verdict, every case checks what left
the desk: no injected header, one verdict per staff copy, no code to strangers.
"""

from __future__ import annotations

import re
import tomllib
from email.message import EmailMessage
from typing import Any

import pytest
from sqlalchemy import func, select

from iqmaild.core.vocabulary import Decision, Reason
from iqmaild.storage.models import Message, Ticket
from tests.harness import DATA, DESK, STAFF, Harness, parse

CASES: list[dict[str, Any]] = tomllib.loads((DATA / "expectations.toml").read_text("utf-8"))[
    "case"
]
OVERSIZE = "GENERATED_OVERSIZE"
PLACEHOLDER = b"{{CODE1000}}"
# smtplib and aiosmtpd do not hand these back byte-exact (tests/data/README.md).
NOT_BYTE_EXACT = frozenset({"nasty_lf_only.eml", "nasty_smtp_smuggling.eml"})

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
        "mime-version",
        "content-type",
        "content-transfer-encoding",
    }
)
# Names a case file tries to smuggle in as headers (folded Subject, encoded CR LF).
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
    body = line * ((1024 * 1024 - len(head)) // len(line) + 2)
    raw = head + body
    assert 1024 * 1024 < len(raw) < 1024 * 1024 + 1024
    return raw


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


async def count(desk: Harness, model: type) -> int:
    async with desk.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


def check_outbound_safety(
    sent: bytes,
    captured: list[bytes],
    mails: list[EmailMessage],
    row: Message | None,
    ticket_number: int | None,
    codes: list[str],
) -> None:
    original = [n for n in names(parse(sent)) if not n.startswith("x-iq-")] if row else []
    staff = [m for m in mails if m.envelope_to == [STAFF]]  # type: ignore[attr-defined]
    customer = [m for m in mails if m.envelope_to != [STAFF]]  # type: ignore[attr-defined]
    for content, mail in zip(captured, mails, strict=True):
        offending = [line for line in header_lines(content) if INJECTED.match(line)]
        assert not offending, offending
        assert "bcc" not in names(mail)
        assert not any(n.startswith("x-injected") for n in names(mail))
        assert STAFF not in mail.envelope_to or mail.envelope_to == [STAFF]  # type: ignore[attr-defined]

    if row is None:  # rejected at SMTP: nothing may leave the desk
        assert mails == []
        return

    # Staff get the message once, as received, under exactly one verdict of ours.
    assert len(staff) == 1, [m.envelope_to for m in mails]  # type: ignore[attr-defined]
    copy = staff[0]
    ours = [n for n in names(copy) if n.startswith("x-iq-")]
    assert len(ours) == len(set(ours)), ours  # forged X-IQ-* removed, ours once each
    assert set(VERDICT_HEADERS) <= set(ours), ours
    assert copy.get_all("X-IQ-Authorization") == [row.decision]
    assert copy["X-IQ-Ticket"] == (str(ticket_number) if ticket_number else "none")
    reasons = str(copy["X-IQ-Reasons"]).split(",")
    assert reasons == (row.reasons or ["none"]), reasons
    assert copy["X-IQ-Account"] == (row.account_id or "none")
    assert [n for n in names(copy) if not n.startswith("x-iq-")] == original

    # Customer mail: our headers only, to the From mailbox only, never for a loop.
    if row.decision == Decision.IGNORED:
        assert customer == [], [m.envelope_to for m in customer]  # type: ignore[attr-defined]
    for mail in customer:
        assert set(names(mail)) <= CUSTOMER_MAIL_HEADERS, names(mail)
        assert len(mail.get_all("Subject") or []) == 1
        assert mail.envelope_to == [row.from_address], (mail.envelope_to, row.from_address)  # type: ignore[attr-defined]
    if NOT_ELIGIBLE & set(row.reasons):
        for content, mail in zip(captured, mails, strict=True):
            if mail in customer:
                assert not [c for c in codes if c.encode() in content], "code to a stranger"
    if row.decision == Decision.PENDING:
        links = [m for m in customer if "/authorize/" in m.as_string()]
        assert len(links) == 1, [m.envelope_to for m in customer]  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
async def test_case(desk: Harness, case: dict[str, Any]) -> None:
    await desk.send(subject="Problem z pocztą", body="Dzień dobry,\nnie działa poczta.\n")
    await desk.drain()
    first = await desk.ticket(1000)
    code1000 = await desk.code(1000)
    before = await desk.last_message()
    tickets_before = await count(desk, Ticket)
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

    if code != 250:
        assert (await desk.last_message()).id == before.id, "a rejected message was stored"
        assert await count(desk, Message) == 1
        assert await count(desk, Ticket) == tickets_before
        check_outbound_safety(raw, captured, mails, None, None, [code1000])
        return

    row = await desk.last_message()
    assert row.id != before.id, "the message was not stored"
    assert row.state == "processed", (row.state, row.last_error)
    if case["file"] in NOT_BYTE_EXACT:
        assert len(row.raw) >= len(raw) - 64
        assert row.raw.startswith(raw.split(b"\n", 1)[0])
    else:
        assert row.raw == raw
    assert row.rcpt_to == case["rcpt"]
    assert row.decision == case["decision"], (row.decision, row.reasons)
    assert set(case["reasons"]) <= set(row.reasons), row.reasons
    assert set(row.reasons) <= {r.value for r in Reason}

    codes = [code1000]
    number: int | None = None
    expected = case["ticket"]
    if expected == "none":
        assert row.ticket_id is None
        assert await count(desk, Ticket) == tickets_before
    elif expected == "new":
        assert row.ticket_id is not None and row.ticket_id != first.id
        assert await count(desk, Ticket) == tickets_before + 1
        async with desk.db.read() as session:
            ticket = await session.get(Ticket, row.ticket_id)
            assert ticket is not None and ticket.number != 1000
        number = ticket.number
        codes.append(await desk.code(number))
    else:
        number = int(expected.removeprefix("existing:"))
        assert row.ticket_id == (await desk.ticket(number)).id
        assert await count(desk, Ticket) == tickets_before

    check_outbound_safety(raw, captured, mails, row, number, codes)
    assert DESK not in [r for m in mails for r in m.envelope_to]  # type: ignore[attr-defined]
