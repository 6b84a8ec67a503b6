"""What the listener does at its edges (issue 5, items 8, 9, 12; issue 7, items 4, 5).

A bad envelope is stored safely and never fails its neighbours; sessions and the
bytes held in memory are capped with answers the MTA retries (421/452); the
wrong protocol is deferred, never bounced; the desk's sub-addresses are the desk.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from iqmaild.persist.store import GroupCommitter, Incoming
from iqmaild.storage.models import Message
from tests.harness import DESK, STAFF, Harness, start_harness, stop_harness
from tests.ingest.test_smtp import Wire, mail_bytes


def _session(port: int, mail_from: bytes) -> list[str]:
    """One SMTP transaction on a raw socket; the MAIL FROM bytes exactly as given."""
    wire = Wire(port)
    try:
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.sock.sendall(b"MAIL FROM:<" + mail_from + b"> SMTPUTF8\r\n")
        replies = [wire.reply()[0]]
        replies.append(wire.cmd(f"RCPT TO:<{DESK}>")[0])
        replies.append(wire.cmd("DATA")[0])
        nul = "\x00" if b"nul-in" in mail_from else ""
        ident = f"<{abs(hash(mail_from))}{nul}@client.test>"
        wire.send_data(mail_bytes(message_id=ident))
        replies.append(wire.reply()[0])
        wire.cmd("QUIT")
        return replies
    finally:
        wire.close()


async def test_a_bad_envelope_is_stored_and_fails_no_neighbour(any_desk: Harness) -> None:
    """MAIL FROM:<\\xff@...> in a commit group with five good messages: six 250s
    (on PostgreSQL a NUL or an over-long address would fail the whole INSERT)."""
    desk = any_desk
    port = desk.daemon.smtp_port
    senders = [b"\xff\xfe@broken.test", b"a\x00b@nul.test", b"x" * 500 + b"@long.test"]
    senders += [b"nul-in-message-id@acme.test"]  # its Message-ID holds a NUL (see below)
    senders += [f"good{i}@acme.test".encode() for i in range(5)]
    results = await asyncio.gather(*(asyncio.to_thread(_session, port, s) for s in senders))
    for sender, replies in zip(senders, results, strict=True):
        assert replies[0].startswith("250") and replies[-1].startswith("250"), (sender, replies)
    async with desk.db.read() as session:
        stored = list(await session.scalars(select(Message.mail_from)))
    assert len(stored) == len(senders)
    assert "\\xff\\xfe@broken.test" in stored  # visible, never ambiguous
    assert all(len(s) <= 512 and "\x00" not in s for s in stored)
    await desk.drain()  # and they are classified like any other mail
    async with desk.db.read() as session:
        states = set(await session.scalars(select(Message.state)))
    assert states == {"processed"}


async def test_a_long_mail_from_survives_another_client_connecting(desk: Harness) -> None:
    """EHLO raises MAIL's line limit (SIZE, SMTPUTF8); another session connecting in
    between must not take that back (aiosmtpd kept the limits in one class-wide dict)."""
    port = desk.daemon.smtp_port

    def run() -> str:
        first = Wire(port)
        try:
            first.reply()
            first.cmd("EHLO client.test")
            second = Wire(port)  # a new session: aiosmtpd cleared the shared limits
            second.reply()
            long_from = "x" * 500 + "@long.test"  # 533 bytes with SMTPUTF8: over 512
            return first.cmd(f"MAIL FROM:<{long_from}> SMTPUTF8")[0]
        finally:
            first.close()
            with contextlib.suppress(NameError):
                second.close()

    assert (await asyncio.to_thread(run)).startswith("250")


async def test_one_failing_message_never_fails_its_commit_group(any_desk: Harness) -> None:
    """The group commit falls back to one transaction each when the batch fails."""
    desk = any_desk
    results: list[object] = []
    committer = GroupCommitter(desk.db, desk.clock, max_batch=64, on_commit=lambda: None)
    task = asyncio.create_task(committer.run())
    try:
        good = [
            Incoming(raw=mail_bytes(message_id=f"<g{i}@x>"), mail_from="a@x", rcpt_to=[DESK])
            for i in range(5)
        ]
        # What the old edge let through: text that cannot be encoded for the database.
        bad = Incoming(raw=mail_bytes(message_id="<bad@x>"), mail_from="\udcff@x", rcpt_to=[DESK])
        outcomes = await asyncio.gather(
            *(committer.store(item) for item in [good[0], good[1], bad, *good[2:]]),
            return_exceptions=True,
        )
        results = list(outcomes)
    finally:
        task.cancel()
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and len(results) == 6
    async with desk.db.read() as session:
        assert len(list(await session.scalars(select(Message.id)))) == 5


@pytest.fixture
async def capped(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(
        tmp_path,
        smtp={"max_connections": 3, "max_inflight_bytes": 3 * 1024 * 1024},
        http={"max_connections": 4},
    )
    try:
        yield h
    finally:
        await stop_harness(h)


def _greeting(port: int) -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.makefile("rb").readline().decode()


async def test_sessions_beyond_the_cap_get_421_and_the_rest_still_work(capped: Harness) -> None:
    port = capped.daemon.smtp_port
    held = [await asyncio.to_thread(_greeting, port) for _ in range(3)]
    assert all(text.startswith("220") for _, text in held)
    sock, text = await asyncio.to_thread(_greeting, port)
    assert text.startswith("421 4.7.0"), text
    sock.close()
    for s, _ in held:
        s.close()
    await asyncio.sleep(0.1)
    code, _ = await capped.send_raw(mail_bytes())  # room again once they are gone
    assert code == 250


async def test_http_connections_beyond_the_cap_get_503(capped: Harness) -> None:
    port = capped.daemon.http_port
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    await asyncio.sleep(0.1)

    def extra() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(200)

    assert (await asyncio.to_thread(extra)).startswith(b"HTTP/1.1 503")
    for sock in held:
        sock.close()
    await asyncio.sleep(0.1)
    async with capped.http.get(capped.base_url + "/healthz") as resp:
        assert resp.status == 200


async def test_data_beyond_the_memory_budget_gets_452_and_goes_through_later(
    capped: Harness,
) -> None:
    """Each DATA reserves three times its declared SIZE; the MTA retries what does not fit."""
    port = capped.daemon.smtp_port
    size = 700 * 1024  # declared: 2.1 MiB reserved each against a 3 MiB budget

    def open_data() -> tuple[Wire, str]:
        wire = Wire(port)
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.cmd(f"MAIL FROM:<owner@acme.test> SIZE={size}")
        wire.cmd(f"RCPT TO:<{DESK}>")
        return wire, wire.cmd("DATA")[0]

    first, reply = await asyncio.to_thread(open_data)
    assert reply.startswith("354")
    second, reply = await asyncio.to_thread(open_data)
    assert reply.startswith("452 4.3.1"), reply
    second.close()
    first.send_data(mail_bytes())
    assert (await asyncio.to_thread(first.reply))[0].startswith("250")
    first.close()
    third, reply = await asyncio.to_thread(open_data)  # the budget is back
    assert reply.startswith("354")
    third.close()


async def test_bytes_beyond_what_was_declared_count_against_the_budget(tmp_path: Path) -> None:
    """SIZE=1 and then megabytes: what arrives is counted, not what was declared. Beyond
    the budget the session is deferred (421) and its bytes let go; the others go on."""
    h = await start_harness(tmp_path, smtp={"max_inflight_bytes": 8 * 1024 * 1024})
    port = h.daemon.smtp_port
    try:

        def open_data() -> Wire:
            wire = Wire(port)
            wire.reply()
            wire.cmd("EHLO client.test")
            wire.cmd("MAIL FROM:<owner@acme.test> SIZE=1")
            wire.cmd(f"RCPT TO:<{DESK}>")
            assert wire.cmd("DATA")[0].startswith("354")
            return wire

        def flood(wire: Wire) -> list[str]:
            line = b"x" * 998 + b"\r\n"
            try:
                for _ in range(4 * 1024):  # 4 MB, far beyond the 1 MB held for SIZE=1
                    wire.sock.sendall(line)
            except OSError:
                pass  # the server closed the session
            replies = []
            with contextlib.suppress(OSError, AssertionError):
                while True:
                    replies.append(wire.reply()[0])
            return replies

        liar, honest = await asyncio.to_thread(open_data), await asyncio.to_thread(open_data)
        replies = await asyncio.to_thread(flood, liar)
        assert replies and replies[0].startswith("421 4.3.1"), replies
        liar.close()
        honest.send_data(mail_bytes())
        assert (await asyncio.to_thread(honest.reply))[0].startswith("250")
        honest.close()
        for _ in range(100):  # the deferred session is closed a moment after its 421
            if h.daemon.smtp_limits.bytes == 0:
                break
            await asyncio.sleep(0.05)
        assert h.daemon.smtp_limits.bytes == 0  # every reservation given back
        async with h.http.get(h.base_url + "/metrics") as resp:
            assert 'iqmaild_smtp_replies_total{code="421"} 1.0' in await resp.text()
    finally:
        await stop_harness(h)


@pytest.mark.parametrize(("listener", "greeting"), [("smtp", "LHLO"), ("lmtp", "EHLO")])
async def test_the_wrong_protocol_is_deferred_never_bounced(
    tmp_path: Path, listener: str, greeting: str
) -> None:
    """Postfix's lmtp: transport to an SMTP listener (or the reverse) gets a 4xx: it keeps
    the mail queued instead of bouncing every customer's message."""
    h = await start_harness(tmp_path, smtp={"protocol": listener})
    try:

        def run() -> list[str]:
            wire = Wire(h.daemon.smtp_port)
            try:
                wire.reply()
                return wire.cmd(f"{greeting} mx.desk.test")
            finally:
                wire.close()

        reply = await asyncio.to_thread(run)
        assert reply[0].startswith("421 4.3.5"), reply
        assert listener.upper() in reply[0]
    finally:
        await stop_harness(h)


async def test_a_sub_address_of_the_desk_is_the_desk(desk: Harness) -> None:
    """Debian's Postfix has recipient_delimiter = +: bok+faktury@ must not bounce."""
    code, _ = await desk.send_raw(mail_bytes(), rcpt=["bok+faktury@desk.test"])
    assert code == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.rcpt_to, row.decision) == (["bok+faktury@desk.test"], "pending")
    [staff] = [m for m in desk.new_mail() if m.envelope_to == [STAFF]]
    assert staff["X-IQ-Desk-Extension"] == "faktury"
    assert (await desk.send_raw(mail_bytes(), rcpt=["staff+x@desk.test"]))[0] == 550


async def test_a_client_declaring_no_size_or_too_little_is_held_to_a_megabyte(
    capped: Harness,
) -> None:
    port = capped.daemon.smtp_port

    def open_data(declared: str) -> tuple[Wire, str]:
        wire = Wire(port)
        wire.reply()
        wire.cmd("EHLO client.test")
        wire.cmd(f"MAIL FROM:<owner@acme.test>{declared}")
        wire.cmd(f"RCPT TO:<{DESK}>")
        return wire, wire.cmd("DATA")[0]

    first, reply = await asyncio.to_thread(open_data, " SIZE=1")
    assert reply.startswith("354")
    second, reply = await asyncio.to_thread(open_data, "")
    assert reply.startswith("452 4.3.1"), reply
    first.close()
    second.close()
