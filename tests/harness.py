"""The test harness: a real daemon on ephemeral loopback ports, a capture relay.

The daemon runs in the test's event loop without its background tasks;
``drain()`` runs the classifier and the outbox until nothing is due, so tests
are deterministic. Its clock is a `FakeClock`: tests of retries, leases,
expiry and rate limits move it (``advance``) instead of sleeping. Mail goes
in over real SMTP (smtplib, byte-exact), pages and the API over real HTTP.
"""

from __future__ import annotations

import asyncio
import email
import re
import smtplib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select

from iqmaild.apply import tickets
from iqmaild.clock import Clock, FakeClock, SystemClock
from iqmaild.config import Config, parse_config
from iqmaild.deliver.capture import CaptureRelay
from iqmaild.service import Daemon
from iqmaild.storage import schema
from iqmaild.storage.db import Database
from iqmaild.storage.directory import import_directory
from iqmaild.storage.models import Message, Ticket

DATA = Path(__file__).parent / "data"
DESK = "bok@desk.test"
STAFF = "staff@desk.test"
PANEL_TOKEN = "panel-secret-token-for-tests-0123456789"

DIRECTORY = {
    "accounts": [
        {
            "id": "acme",
            "primary": "owner@acme.test",
            "name": "ACME sp. z o.o.",
            "lang": "pl",
            "technical": ["tech@acme.test", "tech-shared@acme.test"],
            "additional": ["extra@acme.test"],
            "services": [
                {"id": "acme-www", "name": "WWW", "shared_with": ["dev@partner.test"]},
                {
                    "id": "acme-mail",
                    "name": "Poczta",
                    "shared_with": ["mail-admin@partner.test", "tech-shared@acme.test"],
                },
            ],
        },
        {
            "id": "beta",
            "primary": "boss@beta.test",
            "name": "Beta Ltd",
            "lang": "en",
            "services": [{"id": "beta-vps", "name": "VPS", "shared_with": ["dev@partner.test"]}],
        },
    ]
}


def config_dict(db_url: str, relay_port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "database": {"url": db_url},
        "smtp": {
            "listen": "127.0.0.1:0",
            "desk_addresses": [DESK],
            "hostname": "desk.test",
            "max_message_size": 1024 * 1024,
        },
        "http": {
            "listen": "127.0.0.1:0",
            "public_url": "http://127.0.0.1:8026",
            "panel_token": PANEL_TOKEN,
        },
        "outbound": {
            "relay": f"127.0.0.1:{relay_port}",
            "from": f"BOK IQ <{DESK}>",
            "staff_address": STAFF,
            "retry_base_seconds": 0.05,
            "retry_max_seconds": 0.2,
            "idle_close_seconds": 0.5,
            "rate_limit": {
                "per_recipient_10min": 1000,
                "per_recipient_day": 1000,
                "per_ticket_day": 1000,
            },
        },
        "tickets": {"tag_prefix": "IQ.pl", "number_start": 1000},
        "security": {
            "secret_key": "test-secret-key-0123456789abcdef-xyz",
            "admin_header_patterns": ["X-Mailer: IQ\\.Admin"],
        },
        "processing": {"max_attempts": 3, "retry_seconds": 0.01},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def parse(raw: bytes) -> EmailMessage:
    return email.message_from_bytes(raw, policy=policy.default)  # type: ignore[return-value]


@dataclass
class Harness:
    daemon: Daemon
    relay: CaptureRelay
    config: Config
    http: aiohttp.ClientSession
    seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        return self.daemon.db

    @property
    def clock(self) -> FakeClock:
        clock = self.daemon.clock
        assert isinstance(clock, FakeClock)
        return clock

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.daemon.http_port}"

    # -- sending -----------------------------------------------------------
    async def send_raw(
        self, raw: bytes, mail_from: str = "owner@acme.test", rcpt: list[str] | None = None
    ) -> tuple[int, str]:
        """Send bytes over real SMTP; returns the final reply (code, text)."""
        port = self.daemon.smtp_port
        rcpts = rcpt or [DESK]

        def run() -> tuple[int, str]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("client.test")
                utf8 = not (mail_from + "".join(rcpts)).isascii()
                code, text = client.mail(mail_from, ["SMTPUTF8"] if utf8 else [])
                if code != 250:
                    return code, text.decode()
                accepted = 0
                last = (0, b"")
                for r in rcpts:
                    last = client.rcpt(r)
                    accepted += last[0] == 250
                if not accepted:
                    return last[0], last[1].decode()
                try:
                    code, text = client.data(raw)
                except smtplib.SMTPDataError as exc:
                    return exc.smtp_code, exc.smtp_error.decode()
                return code, text.decode()

        return await asyncio.to_thread(run)

    async def send(
        self,
        *,
        sender: str = "owner@acme.test",
        subject: str = "Problem z pocztą",
        body: str = "Dzień dobry,\nnie działa poczta.\n",
        to: str = DESK,
        cc: list[str] | None = None,
        headers: dict[str, str] | None = None,
        mail_from: str | None = None,
        message_id: str | None = None,
    ) -> bytes:
        msg = EmailMessage()
        msg["From"] = sender
        msg["To"] = to
        if cc:
            msg["Cc"] = ", ".join(cc)
        folded = "\n" in subject  # a pre-folded, pre-encoded Subject goes in byte-exact
        msg["Subject"] = "SUBJECT-PLACEHOLDER" if folded else subject
        msg["Date"] = "Wed, 25 Nov 2026 10:00:00 +0100"
        msg["Message-ID"] = message_id or email.utils.make_msgid(domain="client.test")
        for name, value in (headers or {}).items():
            msg[name] = value
        msg.set_content(body)
        raw = msg.as_bytes(policy=policy.SMTP)
        if folded:
            value = subject.replace("\r\n", "\n").replace("\n", "\r\n").encode()
            raw = raw.replace(b"SUBJECT-PLACEHOLDER", value, 1)
        code, text = await self.send_raw(raw, mail_from if mail_from is not None else sender)
        assert code == 250, (code, text)
        return raw

    async def drain(self) -> None:
        await self.daemon.drain()

    async def authorized_ticket(self, subject: str = "Problem z pocztą") -> int:
        """A new ticket from the primary address, confirmed with its link (the code is out)."""
        await self.send(subject=subject)
        await self.drain()
        auth = next(m for m in self.new_mail() if m.envelope_to == ["owner@acme.test"])
        async with self.http.post(self.base_url + link_in(auth)) as resp:
            assert resp.status == 200, await resp.text()
        await self.drain()
        self.new_mail()
        row = await self.last_message()
        async with self.db.read() as session:
            ticket = await session.get(Ticket, row.ticket_id)
            assert ticket is not None and ticket.authorization == "authorized"
            return ticket.number

    # -- looking ----------------------------------------------------------
    def new_mail(self) -> list[EmailMessage]:
        """Messages the relay captured since the last call."""
        out = [parse(m.content) for m in self.relay.messages[self.seen :]]
        for m, captured in zip(out, self.relay.messages[self.seen :], strict=True):
            m.envelope_to = captured.rcpt_tos  # type: ignore[attr-defined]
        self.seen = len(self.relay.messages)
        return out

    async def last_message(self) -> Message:
        async with self.db.read() as session:
            row = await session.scalar(select(Message).order_by(Message.id.desc()).limit(1))
            assert row is not None
            return row

    async def ticket(self, number: int) -> Ticket:
        async with self.db.read() as session:
            row = await tickets.by_number(session, number)
            assert row is not None
            return row

    async def code(self, number: int) -> str:
        return tickets.code_of(self.config.key, await self.ticket(number))

    async def tag(self, number: int) -> str:
        return f"[IQ.pl#{number}:{await self.code(number)}]"


def link_in(mail: EmailMessage) -> str:
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None
    match = re.search(r"http://127\.0\.0\.1:8026(/authorize/[A-Za-z0-9_-]+)", body.get_content())
    assert match, body.get_content()
    return match.group(1)


async def serve_config(
    path: Path, relay_port: int, smtp_port: int, http_port: int, **sections: dict[str, Any]
) -> dict[str, Any]:
    """Config for a real ``iqmaild serve`` process written to ``path`` (TOML), its
    SQLite database beside it migrated and holding the test directory."""
    smtp = {"listen": f"127.0.0.1:{smtp_port}", **sections.pop("smtp", {})}
    http = {"listen": f"127.0.0.1:{http_port}", **sections.pop("http", {})}
    sections.setdefault("logging", {"level": "warning"})
    data = config_dict(
        f"sqlite+aiosqlite:///{path.with_suffix('.db')}",
        relay_port,
        smtp=smtp,
        http=http,
        **sections,
    )
    path.write_text(to_toml(data), encoding="utf-8")
    db = Database(data["database"]["url"])
    await schema.upgrade(db)
    async with db.transaction() as session:
        await import_directory(session, DIRECTORY, datetime.now(UTC))
    await db.dispose()
    return data


async def start_harness(
    tmp_path: Path,
    db_url: str | None = None,
    clock: Clock | None = None,
    background: bool = False,
    **sections: dict[str, Any],
) -> Harness:
    """``background=True``: as production runs, the worker process and all; with the
    system clock (the worker keeps its own)."""
    relay = CaptureRelay()
    relay_port = await relay.start()
    url = db_url or f"sqlite+aiosqlite:///{tmp_path / 'iqmaild.db'}"
    config = parse_config(config_dict(url, relay_port, **sections))
    db = Database(url)
    await schema.upgrade(db)
    async with db.transaction() as session:
        await import_directory(session, DIRECTORY, datetime.now(UTC))
    await db.dispose()
    if background:
        daemon = Daemon(config, clock=clock or SystemClock(), workers=1)
    else:
        daemon = Daemon(config, clock=clock or FakeClock(datetime.now(UTC)), workers=0)
    await daemon.start(background=background)
    http = aiohttp.ClientSession()
    return Harness(daemon, relay, config, http)


async def stop_harness(h: Harness) -> None:
    await h.http.close()
    await h.daemon.stop()
    await h.relay.stop()


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Just enough TOML for our config dicts (strings, numbers, booleans, lists)."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    out = ""
    if prefix and scalars:
        out += f"[{prefix}]\n"
    out += "".join(line + "\n" for line in scalars)
    for key, value in tables:
        out += to_toml(value, f"{prefix}.{key}" if prefix else key)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
