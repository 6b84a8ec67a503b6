"""Load generation: Postfix's smtp-source, and an asyncio SMTP client.

``smtp-source`` (C) is the cheapest client there is; it sends one fixed message
from one sender, which is all the ingest scenario needs. Everything that needs
realistic mail (many senders, follow-ups, real MIME) or the time of each 250
uses ``send_closed`` (N sessions, as fast as the server answers) or
``send_paced`` (open loop: message i leaves at t0 + i/rate whatever the server
does). Both send pre-built bytes, so the client costs little CPU per message, and
declare ``SIZE=`` in MAIL FROM when the server advertises SIZE, as Postfix does
(``smtp-source`` never does: a server that reserves memory for undeclared sizes
treats its messages as the largest allowed).
Times are ``time.time()``, the clock of the relay and of the daemon's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from bench import proc


@dataclass(frozen=True)
class Outgoing:
    """One message to send: envelope plus data already dot-stuffed, CRLF, final CRLF."""

    key: str  # our Message-ID, without brackets
    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes


@dataclass
class Sent:
    key: str
    started: float  # MAIL FROM written
    done: float  # final reply to DATA read
    code: int  # 0: connection failed
    reply: str

    @property
    def ok(self) -> bool:
        return self.code == 250


class _Connection:
    """One SMTP connection; every wait is bounded by ``asyncio.timeout`` around a whole
    exchange (cheaper than a ``wait_for`` per line, which would cost the client CPU)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.size = False  # the server advertised SIZE: declare it, as Postfix does

    @classmethod
    async def open(cls, port: int, timeout: float) -> _Connection:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(proc.HOST, port, limit=1 << 20)
            conn = cls(reader, writer)
            try:
                code, text = await conn.reply()
                if code != 220:
                    raise ConnectionError(f"greeting {code} {text}")
                writer.write(b"EHLO client.bench.test\r\n")
                lines: list[bytes] = []
                code, text = await conn.reply(lines)
                if code != 250:
                    raise ConnectionError(f"EHLO {code} {text}")
                conn.size = any(line[4:8].upper() == b"SIZE" for line in lines)
            except BaseException:
                conn.close()
                raise
            return conn

    async def reply(self, lines: list[bytes] | None = None) -> tuple[int, str]:
        """The code and last line of a (multi-line) reply; every line into ``lines``."""
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("connection closed")
            if lines is not None:
                lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), line.decode("utf-8", "replace").rstrip("\r\n")

    async def send(self, message: Outgoing, timeout: float) -> Sent:
        async with asyncio.timeout(timeout):
            started = time.time()
            w = self.writer
            size = b" SIZE=%d" % len(message.data) if self.size else b""
            w.write(b"MAIL FROM:<%s>%s\r\n" % (message.mail_from.encode(), size))
            code, text = await self.reply()
            if code == 250:
                for rcpt in message.rcpts:
                    w.write(b"RCPT TO:<%s>\r\n" % rcpt.encode())
                    code, text = await self.reply()
                    if code != 250:
                        break
            if code == 250:
                w.write(b"DATA\r\n")
                code, text = await self.reply()
                if code == 354:
                    w.write(message.data)
                    w.write(b".\r\n")
                    code, text = await self.reply()
            done = time.time()
            if code != 250:
                w.write(b"RSET\r\n")
                await self.reply()
            return Sent(message.key, started, done, code, text)

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                self.writer.write(b"QUIT\r\n")
                await self.reader.readline()
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def _send_one_connection(
    port: int, messages: Sequence[Outgoing], timeout: float
) -> list[Sent]:
    try:
        conn = await _Connection.open(port, timeout)
    except (OSError, ConnectionError, TimeoutError) as exc:
        now = time.time()
        return [Sent(m.key, now, now, 0, f"{type(exc).__name__}: {exc}") for m in messages]
    results = []
    try:
        for message in messages:
            try:
                results.append(await conn.send(message, timeout))
            except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
                now = time.time()
                results.append(Sent(message.key, now, now, 0, f"{type(exc).__name__}: {exc}"))
                break
    finally:
        await conn.quit()
    done = {r.key for r in results}
    now = time.time()
    results += [
        Sent(m.key, now, now, 0, "not sent: connection lost") for m in messages if m.key not in done
    ]
    return results


def _chunks(messages: Sequence[Outgoing], size: int) -> Iterator[Sequence[Outgoing]]:
    for i in range(0, len(messages), size):
        yield messages[i : i + size]


async def send_closed(
    port: int,
    messages: Sequence[Outgoing],
    sessions: int = 20,
    per_connection: int = 1,
    timeout: float = 120.0,
) -> list[Sent]:
    """``sessions`` clients in parallel, each sending its next message when the last got
    its reply; ``per_connection`` messages per SMTP connection (1 = like smtp-source)."""
    work = iter(_chunks(messages, max(1, per_connection)))
    results: list[Sent] = []

    async def client() -> None:
        for chunk in work:
            results.extend(await _send_one_connection(port, chunk, timeout))

    await asyncio.gather(*(client() for _ in range(max(1, sessions))))
    return results


async def send_paced(
    port: int,
    messages: Sequence[Outgoing],
    rate: float,
    timeout: float = 120.0,
    max_open: int = 1000,
) -> list[Sent]:
    """Open loop: message i leaves at t0 + i/rate on its own connection, whether or not
    earlier ones were answered (at most ``max_open`` in flight)."""
    gate = asyncio.Semaphore(max_open)
    results: list[Sent] = []

    async def one(message: Outgoing) -> None:
        async with gate:
            results.extend(await _send_one_connection(port, [message], timeout))

    t0 = time.monotonic()
    tasks = []
    for i, message in enumerate(messages):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(message)))
    await asyncio.gather(*tasks)
    return results


# ---------------------------------------------------------------------------
# smtp-source
# ---------------------------------------------------------------------------


@dataclass
class SourceRun:
    accepted: int
    seconds: float
    started: float
    error: str = ""

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


def smtp_source_command(
    port: int, messages: int, sessions: int, size: int, sender: str, rcpt: str
) -> list[str]:
    return [
        proc.find_tool("smtp-source"),
        "-c",
        "-l",
        str(size),
        "-m",
        str(messages),
        "-s",
        str(sessions),
        "-f",
        sender,
        "-t",
        rcpt,
        f"{proc.HOST}:{port}",
    ]


def run_smtp_source(
    port: int,
    messages: int,
    sessions: int,
    size: int,
    sender: str,
    rcpt: str,
    timeout: float = 600.0,
) -> SourceRun:
    """One timed smtp-source run. It stops at the first reply that is not 2xx, so a run
    whose counter reached ``messages`` got a 250 for every message."""
    cmd = smtp_source_command(port, messages, sessions, size, sender, rcpt)
    started = time.time()
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    error = ""
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate(timeout=10)
        error = f"smtp-source did not finish within {timeout:.0f}s"
    seconds = time.perf_counter() - t0
    counter = [c for c in out.decode(errors="replace").replace("\r", "\n").split() if c.isdigit()]
    accepted = int(counter[-1]) if counter else 0
    if not error and child.returncode != 0:
        error = f"smtp-source status {child.returncode}: {err.decode(errors='replace')[-300:]}"
    if not error and accepted != messages:
        error = f"smtp-source counted {accepted} of {messages} messages"
    return SourceRun(accepted, seconds, started, error)
