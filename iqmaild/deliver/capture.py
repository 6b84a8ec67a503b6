"""A local SMTP sink that stands in for the relay: demo mode and tests.

It keeps every message it is given (in memory, and as .eml files when a
directory is set) so a newcomer can read the authorization mail without a
real MTA. Not for production.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class CaptureRelay:
    directory: Path | None = None
    messages: list[Captured] = field(default_factory=list)
    # Scripted replies for tests: each MAIL/RCPT/DATA pops the next one, if any
    # ("250" lets that command through as usual).
    mail_replies: list[str] = field(default_factory=list)
    rcpt_replies: list[str] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)
    data_delay: float = 0.0  # seconds before the reply to DATA (a slow relay)
    on_message: Any = None
    server: asyncio.AbstractServer | None = None
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.mail_replies:
            reply = self.mail_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self.rcpt_replies:
            reply = self.rcpt_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        raw = envelope.original_content or b""
        item = Captured(envelope.mail_from or "", list(envelope.rcpt_tos), bytes(raw))
        self.messages.append(item)
        path = self._save(item) if self.directory is not None else None
        if self.on_message is not None:
            self.on_message(item, path)
        self.arrived.set()
        return "250 2.0.0 Captured"

    def _save(self, item: Captured) -> Path:
        """Numbered .eml files, continuing after those already in the directory."""
        assert self.directory is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.stem) for p in self.directory.glob("*.eml") if p.stem.isdigit()]
        path = self.directory / f"{max(numbers, default=0) + 1:04d}.eml"
        path.write_bytes(item.content)
        return path

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SMTP(
                self, hostname="capture.local", enable_SMTPUTF8=True, decode_data=False, loop=loop
            ),
            host=host,
            port=port,
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
