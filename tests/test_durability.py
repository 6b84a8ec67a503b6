"""Never lose mail: restarts, kill -9, poison messages (DESIGN.md, "Never lose mail")."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from iqmaild.config import parse_config
from iqmaild.deliver.capture import CaptureRelay
from iqmaild.service import Daemon
from iqmaild.storage import schema
from iqmaild.storage.db import Database
from iqmaild.storage.directory import import_directory
from iqmaild.storage.models import Message
from tests.harness import DESK, DIRECTORY, STAFF, Harness, config_dict, to_toml


def _mail(n: int, sender: str = "owner@acme.test", subject: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, DESK, subject or f"Zgłoszenie {n}"
    msg["Message-ID"] = f"<durable-{n}@client.test>"
    msg.set_content(f"Treść {n}\n")
    return msg.as_bytes()


async def _wait(predicate: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def test_classification_resumes_after_a_restart(desk: Harness) -> None:
    # Accepted and committed, then the daemon stops before classifying it.
    assert (await desk.send_raw(_mail(1)))[0] == 250
    assert (await desk.last_message()).state == "received"
    await desk.daemon.stop()

    daemon = Daemon(desk.config)
    await daemon.start()  # with its background tasks, as `serve` runs it
    desk.daemon = daemon

    async def staff_got_it() -> bool:
        return any(STAFF in m.rcpt_tos for m in desk.relay.messages)

    await _wait(staff_got_it)
    row = await desk.last_message()
    assert (row.state, row.decision) == ("processed", "pending")


async def test_a_poison_message_is_parked_and_does_not_block_the_rest(
    desk: Harness, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import iqmaild.classify.batch as classify

    real = classify.classify

    def rules(facts: Any, *args: Any) -> Any:
        if "POISON" in facts.subject:
            raise RuntimeError("rules blew up")  # stands in for a bug we do not know yet
        return real(facts, *args)

    monkeypatch.setattr(classify, "classify", rules)
    poison = _mail(1, subject="POISON")
    assert (await desk.send_raw(poison))[0] == 250
    assert (await desk.send_raw(_mail(2)))[0] == 250
    for _ in range(10):  # max_attempts = 3 in the harness, retry_seconds tiny
        await desk.drain()
        desk.advance(1)
    async with desk.db.read() as session:
        states = dict((await session.execute(select(Message.id, Message.state))).all())
        dead = await session.scalar(select(Message).where(Message.state == "dead"))
    assert sorted(states.values()) == ["dead", "processed"]
    assert dead is not None and dead.attempts == 3 and "rules blew up" in (dead.last_error or "")
    async with desk.http.get(desk.base_url + "/metrics") as resp:
        text = await resp.text()
    assert 'iqmaild_messages{state="dead"} 1.0' in text

    # Operators see it in the CLI and can put it back once the bug is fixed.
    conf = tmp_path / "cli.toml"
    data = config_dict(desk.config.database.url, desk.relay.port)
    conf.write_text(to_toml(data), encoding="utf-8")
    cli = [sys.executable, "-m", "iqmaild.cli", "--config", str(conf)]
    listed = subprocess.run(
        [*cli, "message", "list", "--state", "dead", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [dead.id] and "rules blew up" in rows[0]["last_error"]
    subprocess.run(
        [*cli, "message", "retry", str(dead.id)], capture_output=True, timeout=60, check=True
    )
    monkeypatch.setattr(classify, "classify", real)
    await desk.drain()
    async with desk.db.read() as session:
        assert (await session.get(Message, dead.id)).state == "processed"  # type: ignore[union-attr]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_kill_9_loses_nothing_that_was_acknowledged(tmp_path: Path) -> None:
    relay = CaptureRelay()
    relay_port = await relay.start()
    smtp_port, http_port = _free_port(), _free_port()
    data = config_dict(
        f"sqlite+aiosqlite:///{tmp_path / 'k.db'}",
        relay_port,
        smtp={"listen": f"127.0.0.1:{smtp_port}"},
        http={"listen": f"127.0.0.1:{http_port}"},
        logging={"level": "warning"},
    )
    conf = tmp_path / "k.toml"
    conf.write_text(to_toml(data), encoding="utf-8")
    db = Database(data["database"]["url"])
    await schema.upgrade(db)
    async with db.transaction() as session:
        await import_directory(session, DIRECTORY, datetime.now(UTC))
    parse_config(data)

    log = tmp_path / "serve.log"

    def serve() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), "serve"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )

    def port_open() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", smtp_port), timeout=0.2):
                return True
        except OSError:
            return False

    async def up() -> bool:
        return port_open()

    acknowledged: list[int] = []
    lock = threading.Lock()

    def client(first: int, count: int) -> None:
        for n in range(first, first + count):
            try:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
                    smtp.sendmail("owner@acme.test", [DESK], _mail(n))
            except (OSError, smtplib.SMTPException):
                return  # the daemon died under us: not acknowledged
            with lock:
                acknowledged.append(n)

    proc = serve()
    try:
        await _wait(up)
        threads = [threading.Thread(target=client, args=(i * 1000, 200)) for i in range(4)]
        for t in threads:
            t.start()
        while len(acknowledged) < 40:  # kill in the middle of the traffic
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await asyncio.to_thread(lambda: [t.join(30) for t in threads])
        assert 40 <= len(acknowledged) < 800

        proc = serve()
        await _wait(up)

        async def all_classified() -> bool:
            async with db.read() as session:
                pending = await session.scalar(
                    select(func.count()).select_from(Message).where(Message.state != "processed")
                )
            return pending == 0

        await _wait(all_classified, 60)
        async with db.read() as session:
            subjects = list(await session.scalars(select(Message.raw)))
        stored = {int(m.group(1)) for raw in subjects if (m := re.search(rb"durable-(\d+)@", raw))}
        assert set(acknowledged) <= stored  # every 250 survived the kill

        async def staff_copies() -> bool:
            got = {
                int(m.group(1))
                for item in relay.messages
                if STAFF in item.rcpt_tos
                if (m := re.search(rb"durable-(\d+)@", item.content))
            }
            return set(acknowledged) <= got

        await _wait(staff_copies, 60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        await db.dispose()
        await relay.stop()


async def test_a_database_outage_is_not_a_processing_attempt(desk: Harness, sabotage) -> None:
    """A long outage must not park good mail as dead letters."""
    from iqmaild.storage.models import Message

    await desk.send()
    row = await desk.last_message()
    sabotage.rename("tickets", "tickets_away")
    for _ in range(desk.config.processing.max_attempts + 2):
        try:
            await desk.daemon.classifier.process_one(row.id)
        except Exception as exc:  # the loop backs off on these
            assert "tickets" in str(exc)
    async with desk.db.read() as session:
        again = await session.get(Message, row.id)
        assert again is not None and (again.state, again.attempts) == ("received", 0)
    sabotage.rename("tickets_away", "tickets")
    await desk.drain()
    assert (await desk.last_message()).state == "processed"
