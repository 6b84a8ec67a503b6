"""One daemon per SQLite file; several on PostgreSQL (issue 6, item 7)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import select, update

from iqmaild.service import Daemon
from iqmaild.storage.db import InstanceRunning
from iqmaild.storage.models import OutboxItem
from tests.harness import Harness, config_dict, to_toml


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
