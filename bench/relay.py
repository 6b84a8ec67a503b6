"""A capturing outbound relay: the daemon's ``outbound.relay`` during a benchmark.

It runs in its own process (``python -m bench.relay HOST:PORT SPOOL``) so that
it neither shares a CPU with the load generator nor delays the clock it reads.
Every message it accepts is appended to a spool file before the 250 goes out:
one JSON line (arrival time, envelope, size) followed by the raw bytes. The
benchmark reads the spool as it grows (``Spool.read_new``) and parses what it
needs from each mail (``Captured``): the staff copy's ``X-IQ-*`` verdict and the
customer's Message-ID inside it, a reply's In-Reply-To, a ticket tag, a link.

The SMTP server is a small ``asyncio.Protocol`` rather than aiosmtpd: it must
take mail faster than the daemon can send it, also after the daemon gets faster.
Arrival times are ``time.time()``: the same clock as the daemon's log ``ts`` and
the load generator's records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from bench import proc

MAX_SIZE = 200 * 1024 * 1024
EHLO_REPLY = (
    b"250-relay.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250 SIZE %d\r\n" % MAX_SIZE
)


# ---------------------------------------------------------------------------
# the server (runs in the relay process)
# ---------------------------------------------------------------------------


class _Writer:
    """Appends records to the spool; one write and flush per message."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.seq = 0

    def record(self, mail_from: str, rcpts: list[str], data: bytes) -> None:
        self.seq += 1
        head = {
            "seq": self.seq,
            "t": time.time(),
            "from": mail_from,
            "rcpt": rcpts,
            "size": len(data),
        }
        self.out.write(json.dumps(head).encode() + b"\n" + data + b"\n")
        self.out.flush()


def _address(arg: bytes) -> str:
    """The path of ``FROM:<a@b> PARAM`` / ``TO:<a@b>``."""
    text = arg.decode("utf-8", "replace").split(":", 1)[-1].strip()
    if text.startswith("<"):
        return text[1 : text.find(">")] if ">" in text else text[1:]
    return text.split(" ", 1)[0]


def _unstuff(data: bytes) -> bytes:
    if data.startswith(b".."):
        data = data[1:]
    return data.replace(b"\r\n..", b"\r\n.")


class _Session(asyncio.Protocol):
    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0
        self.mail_from = ""
        self.rcpts: list[str] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 relay.bench.test ESMTP capture\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        replies: list[bytes] = []
        while self.transport is not None:
            if self.in_data:
                if self.buf.startswith(b".\r\n"):  # empty message
                    end, body_end = 0, 0
                else:
                    end = self.buf.find(b"\r\n.\r\n", max(0, self.scan - 4))
                    if end < 0:
                        self.scan = len(self.buf)
                        break
                    body_end = end + 2
                message = _unstuff(bytes(self.buf[:body_end]))
                del self.buf[: body_end + 3]
                self.in_data, self.scan = False, 0
                self.writer.record(self.mail_from, self.rcpts, message)
                self.mail_from, self.rcpts = "", []
                replies.append(b"250 2.0.0 Ok: captured\r\n")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                break
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 2]
            reply = self._command(line)
            if reply:
                replies.append(reply)
            if line[:4].upper() == b"QUIT":
                self.transport.write(b"".join(replies))
                self.transport.close()
                self.transport = None
                return
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

    def _command(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return EHLO_REPLY
        if verb in (b"HELO", b"NOOP"):
            return b"250 Ok\r\n"
        if verb == b"MAIL":
            self.mail_from, self.rcpts = _address(line[5:]), []
            return b"250 2.1.0 Ok\r\n"
        if verb == b"RCPT":
            self.rcpts.append(_address(line[5:]))
            return b"250 2.1.5 Ok\r\n"
        if verb == b"DATA":
            if not self.rcpts:
                return b"503 5.5.1 No recipients\r\n"
            self.in_data, self.scan = True, 0
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"RSET":
            self.mail_from, self.rcpts = "", []
            return b"250 Ok\r\n"
        if verb == b"QUIT":
            return b"221 Bye\r\n"
        return b"502 5.5.2 Command not implemented\r\n"


def serve(listen: str, spool: str) -> None:
    host, _, port = listen.rpartition(":")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with open(spool, "ab") as out:
            writer = _Writer(out)
            server = await loop.create_server(lambda: _Session(writer), host, int(port))
            await stop.wait()
            server.close()

    asyncio.run(main())


# ---------------------------------------------------------------------------
# what arrived (parsed in the benchmark process)
# ---------------------------------------------------------------------------

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINK = re.compile(r"/authorize/([A-Za-z0-9_-]{20,100})")
_LINK_QP = re.compile(rb"/authorize/([A-Za-z0-9_-]{20,100})")


def tag_pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(r"\[" + re.escape(prefix) + r"#([0-9]+)(?::([0-9a-f]{20}))?\]", re.I)


def _msgid(value: str | None) -> str:
    """The first ``<id>`` of a header, without brackets ("" if none)."""
    if not value:
        return ""
    match = re.search(r"<([^<>\s]+)>", value)
    return match.group(1) if match else value.strip()


@dataclass
class Captured:
    """One mail as the relay accepted it."""

    seq: int
    t: float
    mail_from: str
    rcpts: list[str]
    raw: bytes = field(repr=False)

    @cached_property
    def head(self) -> bytes:
        match = _HEADER_END.search(self.raw)
        return self.raw[: match.start()] if match else self.raw

    def header(self, name: str) -> str:
        """The first header of that name, unfolded ("" if none); no full MIME parse."""
        pattern = re.compile(
            rb"^" + re.escape(name.encode()) + rb":[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M
        )
        match = pattern.search(self.head)
        if match is None:
            return ""
        return " ".join(match.group(1).decode("utf-8", "replace").split())

    @cached_property
    def subject(self) -> str:
        raw = self.header("Subject")
        try:
            return " ".join(str(make_header(decode_header(raw))).split())
        except (ValueError, LookupError):
            return raw

    @property
    def message_id(self) -> str:
        return _msgid(self.header("Message-ID"))

    @property
    def in_reply_to(self) -> str:
        return _msgid(self.header("In-Reply-To"))

    @property
    def verdict(self) -> str:
        """``X-IQ-Authorization`` of a staff copy."""
        return self.header("X-IQ-Authorization")

    def tag(self, prefix: str) -> tuple[int, str | None] | None:
        match = tag_pattern(prefix).search(self.subject)
        if match is None:
            return None
        return int(match.group(1)), (match.group(2).lower() if match.group(2) else None)

    @cached_property
    def text(self) -> str:
        """The decoded text of every text part (links live there)."""
        message = email.message_from_bytes(self.raw, policy=email.policy.default)
        parts = []
        for part in message.walk():
            if part.get_content_maintype() == "text":
                with contextlib.suppress(Exception):
                    parts.append(part.get_content())
        return "\n".join(parts)

    @cached_property
    def link_token(self) -> str | None:
        """The token of an authorization link in the mail, if it has one.

        Quoted-printable text is searched as it is (soft line breaks removed);
        only mail with base64 parts gets a full MIME parse."""
        match = _LINK_QP.search(self.raw.replace(b"=\r\n", b"").replace(b"=\n", b""))
        if match is not None:
            return match.group(1).decode()
        if b"base64" not in self.raw.lower():
            return None
        found = _LINK.search(self.text)
        return found.group(1) if found else None


class Spool:
    """Reads the relay's spool file as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.items: list[Captured] = []

    def read_new(self) -> list[Captured]:
        new: list[Captured] = []
        if not self.path.exists():
            return new
        with self.path.open("rb") as f:
            f.seek(self.offset)
            while True:
                start = f.tell()
                line = f.readline()
                if not line.endswith(b"\n"):
                    f.seek(start)
                    break
                head = json.loads(line)
                data = f.read(head["size"] + 1)
                if len(data) < head["size"] + 1:  # the relay is still writing it
                    f.seek(start)
                    break
                item = Captured(head["seq"], head["t"], head["from"], head["rcpt"], data[:-1])
                new.append(item)
            self.offset = f.tell()
        self.items.extend(new)
        return new


# ---------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------


class Relay:
    """The capture relay as a subprocess; ``with Relay(workdir) as relay: ...``."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or proc.free_ports(1)[0]
        self.spool = Spool(workdir / f"relay-{self.port}.spool")
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Relay:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.relay", f"{proc.HOST}:{self.port}", str(self.spool.path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        proc.wait_smtp(self.port, self.process, 20)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            proc.stop(self.process, 10)
            if self.process.stderr is not None:
                self.process.stderr.close()

    @property
    def items(self) -> list[Captured]:
        return self.spool.items

    def read_new(self) -> list[Captured]:
        return self.spool.read_new()

    def cpu_seconds(self) -> float:
        return proc.tree_cpu_seconds(self.process.pid) if self.process else 0.0

    async def wait_until(
        self,
        done: Callable[[], bool],
        timeout: float,
        on_new: Callable[[list[Captured]], None] | None = None,
        poll: float = 0.02,
    ) -> bool:
        """Feed new mail to ``on_new`` until ``done()`` or the timeout; True if done."""
        deadline = time.monotonic() + timeout
        while True:
            new = self.read_new()
            if new and on_new is not None:
                on_new(new)
            if done():
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll)

    async def settle(
        self, on_new: Callable[[list[Captured]], None], quiet: float = 2.0, limit: float = 30.0
    ) -> None:
        """Feed new mail until none arrived for ``quiet`` seconds (at most ``limit``)."""
        deadline = time.monotonic() + limit
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet:
            new = self.read_new()
            if new:
                on_new(new)
                last = time.monotonic()
            await asyncio.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("listen", help="HOST:PORT")
    parser.add_argument("spool", help="file to append captured mail to")
    args = parser.parse_args(argv)
    serve(args.listen, args.spool)
    return 0


if __name__ == "__main__":
    sys.exit(main())
