"""Attack pass: one message made of many fields must cost what one field costs.

Each structured field was parsed up to 64 KB, but nothing bounded how many were
parsed: 1 MB of To fields (1,000 x 1 KB) took a minute of CPU in the worker,
which parses a whole batch in one thread (every message behind it waited), and
`smtp.max_message_size` allows 25 MB. Now the fields of one name (To and Cc
together) share 64 KB per message, and what is beyond counts as unreadable.
"""

from __future__ import annotations

from email.headerregistry import HeaderRegistry
from typing import Any

import pytest

from iqmaild.parse.headers import HEADER_PARSE_LIMIT
from tests.harness import DESK, Harness

OWNER = "owner@acme.test"
SIZE = 900 * 1024


def _fields(line: bytes) -> bytes:
    return line * (SIZE // len(line))


def _report(inner_fields: bytes) -> bytes:
    return (
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\n"
        b"Final-Recipient: rfc822; a@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
        b"--B\r\nContent-Type: message/rfc822\r\n\r\n" + inner_fields + b"\r\nx\r\n--B--\r\n"
    )


SHAPES = {
    "to-fields": _fields(b"To: " + b"dev@partner.test, " * 55 + b"\r\n"),
    "subject-fields": b"Subject: x\r\n"
    + _fields(b"Subject: " + b"=?utf-8?q?=C4=85?= " * 800 + b"\r\n"),
    "references-with-comments": _fields(b"References: (c) " + b"<a@b.test> " * 1400 + b"\r\n"),
    "admin-marker-fields": _fields(b"X-Mailer: " + b"=?utf-8?q?a?= " * 1100 + b"\r\n"),
    "report-with-embedded-fields": _report(
        _fields(b"Subject: " + b"=?utf-8?q?=C4=85?= " * 800 + b"\r\n")
    ),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
async def test_many_fields_cost_one_budget(
    desk: Harness, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = [0]
    original = HeaderRegistry.__call__

    def counting(self: HeaderRegistry, name: str, value: str) -> Any:
        parsed[0] += len(value)
        return original(self, name, value)

    raw = (
        f"From: {OWNER}\r\nTo: {DESK}\r\nMessage-ID: <{shape}@client.test>\r\n".encode()
        + SHAPES[shape]
        + b"\r\nProsze o pomoc.\r\n"
    )
    assert len(raw) > 800 * 1024
    assert (await desk.send_raw(raw))[0] == 250
    monkeypatch.setattr(HeaderRegistry, "__call__", counting)
    await desk.drain()
    monkeypatch.undo()
    row = await desk.last_message()
    assert row.state == "processed" and row.decision, (row.state, row.last_error)
    # every name the rules and the stored headers read, at most 64 KB each
    assert parsed[0] < 6 * HEADER_PARSE_LIMIT, f"{parsed[0] // 1024} KB handed to the parser"
