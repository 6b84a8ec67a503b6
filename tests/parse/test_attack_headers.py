"""Attack pass on the rebuilt header reader (issue 6): what the fast path reads
must be what the full ``email`` parser (and a mail client) shows.

The ``email`` package, like many clients, ends a header line at a bare CR as well
as at LF; a reader that only splits at LF sees ``Subject: x<CR>Cc: outsider`` as
one Subject, and the outsider in Cc was never counted.
"""

from __future__ import annotations

import email
from email import policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iqmaild.parse.headers import Fields
from tests.harness import DESK, Harness

OWNER = "owner@acme.test"
OUTSIDER = "outsider@evil.test"

BARE_CR = {
    "cc-after-cr-in-subject": ("Subject: Re: {tag} Hasło\rCc: " + OUTSIDER + "\r\n"),
    "cc-after-cr-in-another-field": (
        "Subject: Re: {tag} Hasło\r\nX-Note: a\rCc: " + OUTSIDER + "\r\n"
    ),
    "cc-after-cr-cr": ("Subject: Re: {tag} Hasło\r\nX-Note: a\r\rCc: " + OUTSIDER + "\r\n"),
}


@pytest.mark.parametrize("shape", BARE_CR, ids=list(BARE_CR))
async def test_a_cc_behind_a_bare_cr_is_a_recipient(desk: Harness, shape: str) -> None:
    number = await desk.authorized_ticket()
    old_tag = await desk.tag(number)
    raw = (
        f"From: {OWNER}\r\nTo: {DESK}\r\n" + BARE_CR[shape].format(tag=old_tag) + "Message-ID: "
        f"<{shape}@client.test>\r\n\r\nProszę o nowe hasło.\r\n"
    ).encode()
    shown = email.message_from_bytes(raw, policy=policy.default)
    if shape != "cc-after-cr-cr":  # the email package ends the header section at CR CR
        assert [a.addr_spec for a in shown["cc"].addresses] == [OUTSIDER]
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons) == ("unauthorized", ["unshared_cc"]), row.reasons
    assert await desk.tag(number) != old_tag  # the outsider saw the code: a new one


async def test_a_delivery_report_behind_a_bare_cr_is_a_report(desk: Harness) -> None:
    """The email package reads this Content-Type; the fast check for a report must too."""
    raw = (
        b"From: Mail Delivery <mail-delivery@relay.partner.test>\r\nTo: bok@desk.test\r\n"
        b"Subject: Undelivered Mail\r\nMessage-ID: <dsn-cr@relay.partner.test>\r\n"
        b"MIME-Version: 1.0\rContent-Type: multipart/report; report-type=delivery-status;"
        b' boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nfailed\r\n'
        b"--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
        b"Final-Recipient: rfc822; a@partner.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        b"\r\n--b--\r\n"
    )
    shown = email.message_from_bytes(raw, policy=policy.default)
    assert shown.get_content_type() == "multipart/report"
    assert (await desk.send_raw(raw, mail_from="relay@relay.partner.test"))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert row.decision == "ignored" and "bounce" in row.reasons, row.reasons


def test_every_field_the_email_package_reads_is_read() -> None:
    raw = b"From: a@b.test\r\nSubject: x\rCc: c@d.test\rTo: e@f.test\r\n\r\nbody"
    shown = email.message_from_bytes(raw, policy=policy.default)
    fields = Fields.of(raw)
    assert [(k.lower(), str(v)) for k, v in shown.items()] == [
        (name, value.strip()) for name, value in fields.items
    ]


# -- the fast readers against the full parser, over generated header sections ----

_SEPARATORS = [b"\r\n", b"\n", b"\r", b"\r\r\n", b"\n\r", b"\x00\r\n", b" \r\n", b"\r\n\t"]
_NAMES = [b"From", b"To", b"Cc", b"Subject", b"X-A", b"Cc ", b"cC", b"Content-Type", b"Bcc"]
_VALUES = [
    b"owner@acme.test",
    OUTSIDER.encode(),
    b"Evil <outsider@evil.test>",
    b"=?utf-8?q?x?= <outsider@evil.test>",
    b"bok@desk.test",
    b"multipart/report; report-type=delivery-status; boundary=x",
    b"(c) outsider@evil.test",
    b'"a\\"b" <outsider@evil.test>',
    b"outsider@evil.test (c",
    b"g: outsider@evil.test;",
    b"outsider@evil.test\x0b",
    b"\xc3\xa9 <outsider@evil.test>",
]
_FIELD = st.tuples(
    st.sampled_from(_NAMES),
    st.sampled_from([b" ", b"", b"\t", b"\r\n "]),
    st.sampled_from(_VALUES),
    st.sampled_from(_SEPARATORS),
).map(lambda t: t[0] + b":" + t[1] + t[2] + t[3])
_SECTIONS = st.tuples(
    st.lists(_FIELD, min_size=1, max_size=6), st.sampled_from([b"\r\n", b"", b"\n"])
).map(lambda t: b"".join(t[0]) + t[1] + b"body\r\n")


@given(_SECTIONS)
@settings(database=None, deadline=None, max_examples=2000)
def test_no_recipient_or_report_the_email_package_reads_is_missed(raw: bytes) -> None:
    from iqmaild.core.addresses import normalize
    from iqmaild.parse.message import _may_be_report, _recipients, _report_type, _utf8

    shown = email.message_from_bytes(raw, policy=policy.default)
    recipients, unreadable = _recipients(Fields.of(raw))
    for name in ("to", "cc"):
        try:
            addresses = [a for h in shown.get_all(name) or [] for a in h.addresses]
        except AttributeError:  # the stdlib's own bug on a group ending in NUL
            assert unreadable, raw
            continue
        for address in addresses:
            norm = normalize(_utf8(address.addr_spec) or "")
            assert norm in recipients or unreadable, (raw, address.addr_spec)
    if _report_type(shown) is not None:  # type: ignore[arg-type]
        assert _may_be_report(Fields.of(raw)), raw
