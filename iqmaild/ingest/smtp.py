"""The SMTP/LMTP listener: accepts mail for the desk, 250 only after the commit.

Created in the daemon's own loop (``loop.create_server``), not with aiosmtpd's
threaded Controller. Internal faults answer 4xx, never 5xx: a 5xx after
Postfix queued the mail would bounce to a possibly forged sender. Concurrent
sessions and the message bytes held in memory are capped; beyond the caps the
MTA is told to come back later (421/452), so it keeps the mail queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from iqmaild.config import Config, split_host_port
from iqmaild.core import verp
from iqmaild.core.addresses import normalize, split_extension
from iqmaild.metrics import Metrics
from iqmaild.persist.store import GroupCommitter, Incoming

_SIZE = re.compile(r"^SIZE=(\d{1,15})$", re.IGNORECASE)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ENVELOPE_LIMIT = 500  # what the database column holds, on every back end


def wire_text(value: str | None) -> str:
    """Envelope text from the wire, safe to store: bytes that are not UTF-8 and control
    characters become visible escapes, and it is cut to what the column holds, so one
    bad address can neither fail a commit nor be stored ambiguously."""
    text = value or ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text[:ENVELOPE_LIMIT]


class Limits:
    """Shared by every session of one listener: open sessions and bytes in memory."""

    def __init__(self, max_sessions: int, max_bytes: int) -> None:
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.sessions = 0
        self.bytes = 0

    def reserve(self, amount: int, held: int = 0) -> bool:
        """``held``: what the asking session holds already (alone, it may go on)."""
        if self.bytes - held and self.bytes + amount > self.max_bytes:
            return False  # one message alone may always use the whole budget
        self.bytes += amount
        return True

    def release(self, amount: int) -> None:
        self.bytes = max(0, self.bytes - amount)


class DeskHandler:
    """aiosmtpd hooks; each one is exercised by the tests through the socket."""

    def __init__(
        self, config: Config, committer: GroupCommitter, log: Any, metrics: Metrics
    ) -> None:
        self.desk = frozenset(config.smtp.desk_addresses)
        self.delimiter = config.smtp.recipient_delimiter
        self.return_path = config.return_path_base
        self.key = config.keys
        self.max_size = config.smtp.max_message_size
        self.max_recipients = config.smtp.max_recipients
        self.lmtp = config.smtp.protocol == "lmtp"
        self.committer = committer
        self.log = log
        self.metrics = metrics

    def recipient_reply(self, address: str) -> str | None:
        """None when the address is the desk's (or our signed envelope sender)."""
        norm = normalize(wire_text(address))
        if norm is None:
            return "553 5.1.3 Recipient address syntax is not valid"
        if norm in self.desk:
            return None
        if verp.returned_row(self.key, norm, self.return_path, self.delimiter) is not None:
            return None  # a report about mail we sent
        base, extension = split_extension(norm, self.delimiter)
        if base == self.return_path and extension.startswith("bounce-"):
            return "550 5.1.1 Recipient address rejected: unknown return address"
        if base in self.desk:
            return None  # a sub-address of the desk: the extension stays in rcpt_to
        return "550 5.1.1 Recipient address rejected: not a desk address"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        refused = self.recipient_reply(address)
        if refused is not None:
            self.metrics.inc("smtp_rejected_total", reason="recipient")
            return refused
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if not isinstance(raw, bytes):
            raw = str(raw).encode("utf-8", "surrogateescape")
        if len(raw) > self.max_size:
            self.metrics.inc("smtp_rejected_total", reason="size")
            return self._per_recipient(envelope, "552 5.3.4 Message size exceeds fixed limit")
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        item = Incoming(
            raw=raw,
            mail_from=wire_text(envelope.mail_from),
            rcpt_to=[wire_text(r) for r in envelope.rcpt_tos],
            channel="smtp",
            peer=wire_text(str(peer)),
        )
        try:
            stored = await self.committer.store(item)
        except Exception as exc:
            self.log.error("smtp.store_failed", error=f"{type(exc).__name__}: {exc}"[:300])
            self.metrics.inc("smtp_rejected_total", reason="storage")
            return self._per_recipient(envelope, "451 4.3.0 Temporary storage failure, try again")
        self.log.info(
            "smtp.accepted",
            message=stored.id,
            size=len(raw),
            peer=item.peer,
            recipients=len(item.rcpt_to),
            duplicate=stored.duplicate,
        )
        self.metrics.inc("smtp_accepted_total")
        return self._per_recipient(envelope, f"250 2.0.0 Ok: queued as {stored.id}")

    def _per_recipient(self, envelope: Envelope, status: str) -> str:
        """LMTP answers once per accepted recipient, or Postfix waits and redelivers."""
        if not self.lmtp:
            return status
        return "\r\n".join([status] * max(1, len(envelope.rcpt_tos)))


class _CountingReader:
    """The session's stream reader, counting DATA bytes against their reservation.

    A client may declare a SIZE far below what it sends (or none); every further
    megabyte (times three, as in ``smtp_DATA``) is reserved before it is held, and
    when the budget has no room the session is deferred instead.
    """

    STEP = 1 << 20

    def __init__(self, inner: asyncio.StreamReader, session: _DeskSMTP, reserved: int) -> None:
        self.inner = inner
        self.session = session
        self.reserved = reserved
        self.seen = 0
        self.refused = False

    def _count(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        while not self.refused and 3 * self.seen > self.reserved:
            if self.session.limits.reserve(3 * self.STEP, held=self.reserved):
                self.reserved += 3 * self.STEP
            else:
                self.refused = True
                self.session._over_budget(self.seen)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        chunk = await self.inner.readuntil(separator)
        self._count(chunk)
        return chunk

    async def read(self, n: int = -1) -> bytes:
        chunk = await self.inner.read(n)
        self._count(chunk)
        return chunk

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _DeskSMTP(SMTP):
    """aiosmtpd's SMTP with our caps, and real mail's long lines kept.

    Real mail has lines over RFC 5322's 998 (Postfix passes them). A session
    beyond ``max_sessions`` gets 421 before any command; DATA that would take
    the bytes held in memory beyond ``max_bytes`` gets 452, and the MTA retries.
    A reservation lasts until the message is committed (or refused).
    """

    line_length_limit = 1 << 20
    wrong_greeting = "LHLO"  # what an LMTP client sends to an SMTP listener

    def __init__(self, handler: DeskHandler, limits: Limits, log: Any, **kwargs: Any) -> None:
        # aiosmtpd keeps the per-command line limits in one dict on the class: every new
        # session clears it, so a session's EHLO allowance (SIZE, SMTPUTF8) vanished when
        # another client connected and its long MAIL FROM got 500. One dict per session.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.log = log
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None and self.limits.sessions >= self.limits.max_sessions:
            self.event_handler.metrics.inc("smtp_replies_total", code="421")
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        if self.transport is None:
            self.limits.sessions += 1
            self._counted = True
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if not self._counted:
            return  # refused in connection_made: aiosmtpd never saw it
        self._counted = False
        self.limits.sessions -= 1
        super().connection_lost(error)

    def _declared_size(self) -> int:
        """The size the client declared (Postfix always does), 0 when it declared none."""
        limit = self.data_size_limit or 0
        for option in getattr(self.envelope, "mail_options", None) or ():
            match = _SIZE.match(option)
            if match:
                return min(int(match.group(1)), limit) if limit else int(match.group(1))
        return 0

    async def smtp_DATA(self, arg: str) -> None:
        # Until its commit a message is held about three times: aiosmtpd's lines,
        # their join, and what the database driver is handed.
        # The declared SIZE is the MTA's word (Postfix's is true); a client that
        # declares none or too little is held to at least a megabyte up front, and
        # what it really sends is counted as it arrives (_CountingReader).
        reserved = 3 * max(self._declared_size(), min(1 << 20, self.data_size_limit or 1 << 20))
        if not self.limits.reserve(reserved):
            await self.push("452 4.3.1 Insufficient system resources, try again later")
            return
        reader = _CountingReader(self._reader, self, reserved)
        self._reader = reader  # type: ignore[assignment]
        try:
            await super().smtp_DATA(arg)
        finally:
            self._reader = reader.inner
            self.limits.release(reader.reserved)

    def _over_budget(self, held: int) -> None:
        """More bytes than reserved and no budget left: defer, and let go of them.

        aiosmtpd keeps every line of a DATA until its end, so the only way to free
        them is to end the session; 421 mid-DATA makes the MTA keep the mail queued
        and retry, as 452 at DATA does.
        """
        self.log.warning("smtp.memory_budget", held_bytes=held, budget=self.limits.max_bytes)
        transport = self.transport
        if transport is None:
            return
        # Read no more, say why, and close a moment later: closing at once with the
        # client's data unread would reset the connection before it reads the 421.
        transport.pause_reading()  # type: ignore[attr-defined]
        transport.write(b"421 4.3.1 Insufficient system resources, try again later\r\n")  # type: ignore[attr-defined]
        with contextlib.suppress(OSError, NotImplementedError):
            transport.write_eof()  # type: ignore[attr-defined]
        self.event_handler.metrics.inc("smtp_replies_total", code="421")
        asyncio.get_running_loop().call_later(1.0, transport.close)

    async def _refuse_protocol(self, command: str) -> None:
        """The MTA speaks the other protocol: defer (4xx), never bounce customer mail."""
        mine = "LMTP" if isinstance(self, LMTP) else "SMTP"
        self.log.error(
            "smtp.protocol_mismatch",
            listener=mine,
            command=command,
            hint="set smtp.protocol to match the MTA's transport (smtp: or lmtp:)",
        )
        await self.push(f"421 4.3.5 This is an {mine} listener, {command} is not {mine}")
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    async def smtp_LHLO(self, arg: str) -> None:
        await self._refuse_protocol("LHLO")

    async def push(self, status: str) -> None:
        """Every reply counted by its code (a multi-line reply once, LMTP's per recipient)."""
        for line in status.split("\r\n"):
            code = line[:3]
            if len(line) >= 3 and code.isdigit() and line[3:4] != "-":
                self.event_handler.metrics.inc("smtp_replies_total", code=code)
        await super().push(status)


class _DeskLMTP(LMTP, _DeskSMTP):
    async def smtp_LHLO(self, arg: str) -> None:
        await LMTP.smtp_LHLO(self, arg)

    async def smtp_HELO(self, arg: str) -> None:
        await self._refuse_protocol("HELO")

    async def smtp_EHLO(self, arg: str) -> None:
        await self._refuse_protocol("EHLO")

    async def push(self, status: str) -> None:
        """aiosmtpd's own DATA errors come once; LMTP needs one per recipient."""
        rcpts = len(getattr(self.envelope, "rcpt_tos", None) or ())
        if rcpts > 1 and status.startswith(("552 Error: Too much", "500 Line too long")):
            status = "\r\n".join([status] * rcpts)
        await super().push(status)


async def start_listener(
    config: Config, handler: DeskHandler, log: Any
) -> tuple[asyncio.AbstractServer, int, Limits]:
    host, port = split_host_port(config.smtp.listen)
    protocol = _DeskLMTP if config.smtp.protocol == "lmtp" else _DeskSMTP
    loop = asyncio.get_running_loop()
    limits = Limits(config.smtp.max_connections, config.smtp.max_inflight_bytes)

    def factory() -> SMTP:
        return protocol(
            handler,
            limits,
            log,
            hostname=config.smtp.hostname,
            ident="iqmaild",
            data_size_limit=config.smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=config.smtp.idle_timeout,
            loop=loop,
        )

    server = await loop.create_server(factory, host=host, port=port)
    bound = server.sockets[0].getsockname()[1]
    return server, bound, limits
