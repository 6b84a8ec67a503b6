"""The SMTP/LMTP listener over a real socket (DESIGN.md: "What the daemon is", "Scale").

Every reply the MTA sees is checked here: recipients, size limits, extensions,
250 only after the commit, 451 on storage failure, LMTP's per-recipient replies,
duplicate deliveries and group commit under many concurrent senders.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import func, select

from iqmaild.storage.models import Message
from tests.conftest import Sabotage, harness_on
from tests.harness import DESK, STAFF, Harness

LIMIT = 1024 * 1024  # smtp.max_message_size in the harness
SECOND_DESK = "pomoc@desk.test"


def mail_bytes(
    subject: str = "Test", message_id: str = "<m1@client.test>", body: str = ""
) -> bytes:
    text = body or "Dzień dobry,\r\n.linia z kropką na początku\r\nPozdrawiam\r\n"
    return (
        "From: owner@acme.test\r\n"
        f"To: {DESK}\r\n"
        f"Subject: {subject}\r\n"
        "Date: Wed, 25 Nov 2026 10:00:00 +0100\r\n"
        f"Message-ID: {message_id}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        f"{text}"
    ).encode()


def rows_on_disk(sabotage: Sabotage) -> list[tuple[int, bytes, str]]:
    """The messages table read through a connection of its own (what is committed)."""
    if sabotage.url.startswith("sqlite"):
        rows = sabotage.rows("SELECT id, raw, mail_from FROM messages ORDER BY id")
        return [(int(i), bytes(raw), str(sender)) for i, raw, sender in rows]
    rows = sabotage.rows("SELECT id, encode(raw, 'hex'), mail_from FROM messages ORDER BY id")
    return [(int(i), bytes.fromhex(raw), sender) for i, raw, sender in rows]


async def count_messages(h: Harness) -> int:
    async with h.db.read() as session:
        return int(await session.scalar(select(func.count(Message.id))) or 0)


class Wire:
    """A line-level SMTP/LMTP client on a raw socket, run in a worker thread."""

    def __init__(self, port: int, timeout: float = 15) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> list[str]:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            line = self.file.readline()
            assert line, "connection closed"
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if len(text) < 4 or text[3] != "-":
                return lines

    def cmd(self, line: str) -> list[str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send_data(self, raw: bytes) -> None:
        stuffed = b"".join(
            b"." + line if line.startswith(b".") else line for line in raw.splitlines(keepends=True)
        )
        self.sock.sendall(stuffed + b".\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# -- recipients -------------------------------------------------------------


async def test_rcpt_to_a_non_desk_address_is_rejected_550_511(desk: Harness) -> None:
    def run() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", desk.daemon.smtp_port, timeout=15) as client:
            client.ehlo("client.test")
            client.mail("owner@acme.test")
            return client.rcpt("someone@elsewhere.test")

    code, text = await asyncio.to_thread(run)
    assert code == 550
    assert text.decode().startswith("5.1.1")
    code, text = await desk.send_raw(mail_bytes(), rcpt=["staff@desk.test"])
    assert code == 550
    assert await count_messages(desk) == 0


async def test_desk_address_is_matched_case_insensitively(desk: Harness) -> None:
    raw = mail_bytes()
    code, text = await desk.send_raw(raw, rcpt=["BOK@Desk.TEST"])
    assert (code, text.split(":")[0]) == (250, "2.0.0 Ok")
    row = await desk.last_message()
    assert row.raw == raw


# -- size and extensions ----------------------------------------------------


async def test_ehlo_advertises_size_smtputf8_and_8bitmime(desk: Harness) -> None:
    def run() -> dict[str, str]:
        with smtplib.SMTP("127.0.0.1", desk.daemon.smtp_port, timeout=15) as client:
            code, _ = client.ehlo("client.test")
            assert code == 250
            return dict(client.esmtp_features)

    features = await asyncio.to_thread(run)
    assert features.get("size") == str(LIMIT)
    assert "smtputf8" in features
    assert "8bitmime" in features


async def test_mail_from_with_size_over_the_limit_is_refused_552(desk: Harness) -> None:
    def run() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", desk.daemon.smtp_port, timeout=15) as client:
            client.ehlo("client.test")
            too_big = client.mail("owner@acme.test", [f"SIZE={LIMIT + 1}"])
            client.rset()
            fits = client.mail("owner@acme.test", [f"SIZE={LIMIT // 2}"])
            return too_big, fits

    (code, _), (fits, _) = await asyncio.to_thread(run)
    assert code == 552
    assert fits == 250


async def test_data_over_the_limit_is_refused_552_and_nothing_is_stored(
    desk: Harness, sabotage: Sabotage
) -> None:
    line = b"x" * 998 + b"\r\n"
    raw = mail_bytes() + line * (LIMIT // len(line) + 10)
    assert len(raw) > LIMIT
    code, _ = await desk.send_raw(raw)
    assert code == 552
    assert await count_messages(desk) == 0
    assert rows_on_disk(sabotage) == []
    # A mail within the limit still goes through on the next try.
    small = mail_bytes() + line * 10
    code, _ = await desk.send_raw(small)
    assert code == 250
    assert await count_messages(desk) == 1


async def test_utf8_envelope_with_smtputf8_is_accepted_and_processed(
    desk: Harness, sabotage: Sabotage
) -> None:
    sender = "użytkownik@przykład.test"  # RFC 6531: UTF-8 in the envelope
    raw = (
        "From: Zażółć Gęślą <owner@acme.test>\r\n"  # RFC 6532: UTF-8 in headers
        f"To: {DESK}\r\n"
        "Subject: Zażółć gęślą jaźń\r\n"
        "Message-ID: <utf8.1@client.test>\r\n"
        "\r\n"
        "Treść wiadomości.\r\n"
    ).encode()

    def run() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", desk.daemon.smtp_port, timeout=15) as client:
            client.ehlo("client.test")
            mail = client.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"])
            rcpt = client.rcpt(DESK)
            return mail, rcpt, client.data(raw)

    mail, rcpt, data = await asyncio.to_thread(run)
    assert (mail[0], rcpt[0], data[0]) == (250, 250, 250)
    [(_, stored, mail_from)] = rows_on_disk(sabotage)
    assert stored == raw
    assert mail_from == sender
    # Classified like any other mail of the owner, not parked as a dead letter.
    await desk.drain()
    row = await desk.last_message()
    assert (row.state, row.decision) == ("processed", "pending")
    assert "Zażółć gęślą jaźń" in row.subject
    assert sorted(m.envelope_to[0] for m in desk.new_mail()) == ["owner@acme.test", STAFF]


# -- durability -------------------------------------------------------------


async def test_250_comes_only_after_the_commit_with_the_exact_bytes(
    desk: Harness, sabotage: Sabotage
) -> None:
    # 8-bit body, a dot-stuffed line, a long line, a NUL byte: stored exactly as received.
    raw = mail_bytes(
        body="Zażółć\r\n..dwie kropki\r\n.\tkropka\r\n" + "y" * 3000 + "\r\nA\x00B\r\n"
    )

    def run() -> tuple[int, list[tuple[int, bytes, str]]]:
        with smtplib.SMTP("127.0.0.1", desk.daemon.smtp_port, timeout=15) as client:
            client.ehlo("client.test")
            client.mail("owner@acme.test")
            client.rcpt(DESK)
            code, _ = client.data(raw)
            # Still in the client thread, before the daemon's loop runs again:
            # what the 250 promised must already be on disk.
            return code, rows_on_disk(sabotage)

    code, rows = await asyncio.to_thread(run)
    assert code == 250
    assert len(rows) == 1
    assert rows[0][1] == raw
    assert rows[0][2] == "owner@acme.test"


async def test_storage_failure_answers_451_430_and_the_retry_succeeds(
    desk: Harness, sabotage: Sabotage, break_messages_table
) -> None:
    raw = mail_bytes()
    break_messages_table(True)
    code, text = await desk.send_raw(raw)
    assert code == 451
    assert text.startswith("4.3.0")
    # The MTA keeps the mail and retries; once the database is back it is stored once.
    break_messages_table(False)
    code, _ = await desk.send_raw(raw)
    assert code == 250
    rows = rows_on_disk(sabotage)
    assert [r[1] for r in rows] == [raw]
    async with desk.http.get(desk.base_url + "/metrics") as resp:
        metrics = await resp.text()
    assert 'iqmaild_smtp_rejected_total{reason="storage"} 1.0' in metrics


# -- duplicates ---------------------------------------------------------------


async def test_duplicate_delivery_of_the_same_bytes_is_stored_once(desk: Harness) -> None:
    raw = mail_bytes(message_id="<dup@client.test>")
    first = await desk.send_raw(raw)
    again = await desk.send_raw(raw)  # the MTA retrying after a lost 250
    assert first[0] == again[0] == 250
    assert first[1] == again[1]  # the same "queued as" id
    assert await count_messages(desk) == 1


async def test_a_different_message_reusing_a_message_id_is_stored_too(desk: Harness) -> None:
    one = mail_bytes(subject="Pierwsza", message_id="<same@client.test>")
    two = mail_bytes(subject="Druga", message_id="<same@client.test>")
    assert (await desk.send_raw(one))[0] == 250
    assert (await desk.send_raw(two))[0] == 250
    async with desk.db.read() as session:
        rows = list(await session.scalars(select(Message).order_by(Message.id)))
    assert [r.raw for r in rows] == [one, two]
    assert {r.message_id for r in rows} == {"<same@client.test>"}


# -- group commit -------------------------------------------------------------


async def test_many_concurrent_senders_all_get_250_after_few_commits(
    any_desk: Harness, tmp_path: Path
) -> None:
    desk = any_desk
    senders = 20
    barrier = threading.Barrier(senders, timeout=15)
    before = desk.daemon.committer.batches

    def one(i: int) -> tuple[int, bytes]:
        raw = mail_bytes(subject=f"Wątek {i}", message_id=f"<conc.{i}@client.test>")
        with smtplib.SMTP("127.0.0.1", desk.daemon.smtp_port, timeout=30) as client:
            client.ehlo("client.test")
            client.mail("owner@acme.test")
            client.rcpt(DESK)
            barrier.wait()  # every sender starts DATA at the same moment
            code, _ = client.data(raw)
            return code, raw

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=senders) as pool:
        results = await asyncio.gather(
            *(loop.run_in_executor(pool, one, i) for i in range(senders))
        )
    assert [code for code, _ in results] == [250] * senders
    async with desk.db.read() as session:
        stored = set(await session.scalars(select(Message.raw)))
    assert stored == {raw for _, raw in results}
    batches = desk.daemon.committer.batches - before
    assert 1 <= batches <= senders // 2


# -- LMTP -------------------------------------------------------------------


@pytest.fixture
async def lmtp(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    sections = {"smtp": {"protocol": "lmtp", "desk_addresses": [DESK, SECOND_DESK]}}
    async with harness_on(backend, tmp_path, **sections) as h:
        yield h


def lmtp_transaction(
    port: int, raw: bytes, rcpts: list[str], timeout: float = 15
) -> tuple[list[str], list[str]]:
    """LHLO .. DATA; returns the RCPT replies and every status line after the data.

    After reading one status per accepted recipient the client sends QUIT: the
    next line must be the 221, so a surplus status line would show up here.
    """
    wire = Wire(port, timeout)
    try:
        assert wire.reply()[0].startswith("220")
        lhlo = wire.cmd("LHLO client.test")
        assert lhlo[-1].startswith("250")
        assert wire.cmd("MAIL FROM:<owner@acme.test>")[0].startswith("250")
        rcpt_replies = [wire.cmd(f"RCPT TO:<{r}>")[0] for r in rcpts]
        accepted = sum(r.startswith("250") for r in rcpt_replies)
        assert wire.cmd("DATA")[0].startswith("354")
        wire.send_data(raw)
        statuses = [wire.reply()[0] for _ in range(accepted)]
        wire.sock.sendall(b"QUIT\r\n")
        after = wire.reply()[0]
        return rcpt_replies, [*statuses, after]
    finally:
        wire.close()


async def test_lmtp_answers_once_per_accepted_recipient(lmtp: Harness) -> None:
    sabotage = Sabotage(lmtp.config.database.url)
    raw = mail_bytes()
    rcpt, statuses = await asyncio.to_thread(
        lmtp_transaction,
        lmtp.daemon.smtp_port,
        raw,
        [DESK, "nobody@elsewhere.test", SECOND_DESK.upper()],
    )
    assert [r[:3] for r in rcpt] == ["250", "550", "250"]
    assert [s[:3] for s in statuses] == ["250", "250", "221"]
    [(_, stored, _)] = rows_on_disk(sabotage)
    assert stored == raw


async def test_lmtp_storage_failure_answers_451_per_recipient(lmtp: Harness) -> None:
    Sabotage(lmtp.config.database.url).rename("messages", "messages_away")
    _, statuses = await asyncio.to_thread(
        lmtp_transaction, lmtp.daemon.smtp_port, mail_bytes(), [DESK, SECOND_DESK]
    )
    assert [s[:9] for s in statuses] == ["451 4.3.0", "451 4.3.0", "221 Bye"[:9]]


async def test_lmtp_oversized_data_answers_552_per_recipient(lmtp: Harness) -> None:
    line = b"x" * 998 + b"\r\n"
    raw = mail_bytes() + line * (LIMIT // len(line) + 10)
    _, statuses = await asyncio.to_thread(
        lmtp_transaction, lmtp.daemon.smtp_port, raw, [DESK, SECOND_DESK], 2
    )
    assert [s[:3] for s in statuses] == ["552", "552", "221"]
    assert await count_messages(lmtp) == 0
