"""The SMTP/LMTP listener: accepts mail for the desk, 250 only after the commit.

Created in the daemon's own loop (``loop.create_server``), not with aiosmtpd's
threaded Controller. Internal faults answer 451 4.3.0, never 5xx: a 5xx after
Postfix queued the mail would bounce to a possibly forged sender.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from iqmaild.config import Config, split_host_port
from iqmaild.core.addresses import normalize
from iqmaild.ingest.store import GroupCommitter, Incoming
from iqmaild.metrics import Metrics


class DeskHandler:
    """aiosmtpd hooks; each one is exercised by the tests through the socket."""

    def __init__(
        self, config: Config, committer: GroupCommitter, log: Any, metrics: Metrics
    ) -> None:
        self.desk = frozenset(config.smtp.desk_addresses)
        self.max_size = config.smtp.max_message_size
        self.max_recipients = config.smtp.max_recipients
        self.lmtp = config.smtp.protocol == "lmtp"
        self.committer = committer
        self.log = log
        self.metrics = metrics

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if normalize(address) not in self.desk:
            self.metrics.inc("smtp_rejected_total", reason="recipient")
            return "550 5.1.1 Recipient address rejected: not a desk address"
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
            mail_from=envelope.mail_from or "",
            rcpt_to=list(envelope.rcpt_tos),
            channel="smtp",
            peer=str(peer),
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


class _LongLinesSMTP(SMTP):
    """Real mail has lines over RFC 5322's 998 (Postfix passes them): keep them."""

    line_length_limit = 1 << 20


class _LongLinesLMTP(LMTP):
    line_length_limit = 1 << 20

    async def push(self, status: str) -> None:
        """aiosmtpd's own DATA errors come once; LMTP needs one per recipient."""
        rcpts = len(getattr(self.envelope, "rcpt_tos", None) or ())
        if rcpts > 1 and status.startswith(("552 Error: Too much", "500 Line too long")):
            status = "\r\n".join([status] * rcpts)
        await super().push(status)


async def start_listener(
    config: Config, handler: DeskHandler
) -> tuple[asyncio.AbstractServer, int]:
    host, port = split_host_port(config.smtp.listen)
    protocol = _LongLinesLMTP if config.smtp.protocol == "lmtp" else _LongLinesSMTP
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return protocol(
            handler,
            hostname=config.smtp.hostname,
            ident="iqmaild",
            data_size_limit=config.smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            loop=loop,
        )

    server = await loop.create_server(factory, host=host, port=port)
    bound = server.sockets[0].getsockname()[1]
    return server, bound
