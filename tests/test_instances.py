"""One daemon per SQLite file; several on PostgreSQL (issue 6, item 7)."""

from __future__ import annotations

import asyncio
import contextlib
import smtplib
import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from iqmaild.deliver.capture import CaptureRelay
from iqmaild.service import Daemon
from iqmaild.storage.db import Database, InstanceRunning
from iqmaild.storage.directory import import_directory
from iqmaild.storage.models import Message, OutboxItem, Ticket
from tests.harness import DESK, DIRECTORY, Harness, config_dict, to_toml
from tests.pg import temp_database
from tests.test_durability import _free_port, _mail, _wait


async def test_a_second_daemon_on_the_same_sqlite_file_touches_nothing(
    sqlite_desk: Harness,
) -> None:
    """It refuses before it takes back the first one's claims (which it once did, and
    then failed to bind its port: two staff copies were each delivered twice)."""
    desk = sqlite_desk
    await desk.send()
    await desk.daemon.classifier.drain()
    async with desk.db.transaction() as session:
        await session.execute(
            update(OutboxItem).values(state="sending", claimed_by=desk.daemon.outbox.instance)
        )
    second = Daemon(desk.config, clock=desk.clock, workers=0)
    with pytest.raises(InstanceRunning, match="another iqmaild serve is running"):
        await second.start(background=False)
    await second.db.dispose()
    async with desk.db.read() as session:
        states = set(await session.scalars(select(OutboxItem.state)))
    assert states == {"sending"}  # the first instance's claims are untouched

    conf = desk.config.database.url.split(":///", 1)[1] + ".toml"
    data = config_dict(desk.config.database.url, desk.relay.port)
    with open(conf, "w", encoding="utf-8") as out:
        out.write(to_toml(data))
    result = subprocess.run(
        [sys.executable, "-m", "iqmaild.cli", "--config", conf, "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "another iqmaild serve is running" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.postgres
async def test_three_daemons_on_one_postgresql_share_the_work_exactly_once(
    tmp_path: Path,
) -> None:
    """5,000 messages spread over three `iqmaild serve` processes (each with its worker),
    some delivered twice to different instances as an MTA retrying elsewhere would:
    each stored once, ticket numbers unique, every outbound mail at the relay once."""
    total, repeated = 5000, 300
    relay = CaptureRelay()
    relay_port = await relay.start()
    procs: list[subprocess.Popen[bytes]] = []
    async with temp_database() as url:
        try:
            db = Database(url)
            async with db.transaction() as session:
                await import_directory(session, DIRECTORY, datetime.now(UTC))
            ports = []
            for n in range(3):
                smtp_port, http_port = _free_port(), _free_port()
                data = config_dict(
                    url,
                    relay_port,
                    smtp={"listen": f"127.0.0.1:{smtp_port}"},
                    http={"listen": f"127.0.0.1:{http_port}"},
                    logging={"level": "warning"},
                    processing={"workers": 1, "batch_size": 64},
                    outbound={
                        "rate_limit": {
                            "per_recipient_10min": 100_000,
                            "per_recipient_day": 100_000,
                            "per_ticket_day": 100,
                        }
                    },
                )
                conf = tmp_path / f"i{n}.toml"
                conf.write_text(to_toml(data), encoding="utf-8")
                with (tmp_path / f"i{n}.log").open("wb") as log:
                    procs.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), "serve"],
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        )
                    )
                ports.append(smtp_port)

            async def up() -> bool:
                return all(_open(port) for port in ports)

            await _wait(up, 60)

            def sender(worker: int) -> int:
                sent = 0
                with contextlib.ExitStack() as stack:
                    clients = [
                        stack.enter_context(smtplib.SMTP("127.0.0.1", port, timeout=60))
                        for port in ports
                    ]
                    for n in range(worker, total, 3):
                        raw = _mail(n)
                        clients[n % 3].sendmail("owner@acme.test", [DESK], raw)
                        if n < repeated:  # the MTA tries again at another instance
                            clients[(n + 1) % 3].sendmail("owner@acme.test", [DESK], raw)
                        sent += 1
                return sent

            counts = await asyncio.gather(*(asyncio.to_thread(sender, w) for w in range(3)))
            assert sum(counts) == total

            async def all_done() -> bool:
                async with db.read() as session:
                    waiting = await session.scalar(
                        select(func.count())
                        .select_from(Message)
                        .where(Message.state != "processed")
                    )
                    unsent = await session.scalar(
                        select(func.count())
                        .select_from(OutboxItem)
                        .where(OutboxItem.state != "sent")
                    )
                    stored = await session.scalar(select(func.count()).select_from(Message))
                return stored == total and waiting == 0 and unsent == 0

            await _wait(all_done, 240)
            async with db.read() as session:
                numbers = list(await session.scalars(select(Ticket.number)))
                rows = await session.scalar(select(func.count()).select_from(OutboxItem))
            assert len(numbers) == len(set(numbers)) == total
            assert rows == 2 * total  # a link and a staff copy each
            per_row: dict[str, int] = {}
            for item in relay.messages:
                per_row[item.mail_from] = per_row.get(item.mail_from, 0) + 1
            assert len(per_row) == rows and set(per_row.values()) == {1}, "each mail once"
            await db.dispose()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
            await relay.stop()


def _open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
