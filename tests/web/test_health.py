"""/healthz says whether intake can commit (issue 5, item 11).

A full disk still answers reads: health that only pings said "ok" while every
message got 451. Now the last intake attempt and, when idle, a probe write decide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Harness, start_harness, stop_harness
from tests.ingest.test_smtp import mail_bytes


async def health(h: Harness) -> tuple[int, str]:
    async with h.http.get(h.base_url + "/healthz") as resp:
        return resp.status, (await resp.json())["status"]


async def test_health_turns_503_when_intake_cannot_commit(
    desk: Harness, tmp_path: Path, break_messages_table
) -> None:
    assert await health(desk) == (200, "ok")
    break_messages_table(True)
    assert (await desk.send_raw(mail_bytes()))[0] == 451
    status, text = await health(desk)
    assert status == 503 and "intake cannot commit" in text
    break_messages_table(False)
    assert (await desk.send_raw(mail_bytes()))[0] == 250
    assert await health(desk) == (200, "ok")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB file system (tmpfs) that the test can fill up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_answers_451_and_health_says_so(small_disk: Path) -> None:
    h = await start_harness(small_disk, db_url=f"sqlite+aiosqlite:///{small_disk / 'd.db'}")
    try:
        big = mail_bytes(body="x" * 200_000 + "\r\n")
        assert (await h.send_raw(big))[0] == 250
        filler = fill(small_disk)
        code, text = await h.send_raw(big.replace(b"<m1@", b"<m2@"))
        assert (code, text[:5]) == (451, "4.3.0")  # never 250, never 5xx
        status, reason = await health(h)
        assert status == 503 and "intake cannot commit" in reason
        filler.unlink()
        assert (await h.send_raw(big.replace(b"<m1@", b"<m3@")))[0] == 250
        assert (await health(h))[0] == 200
    finally:
        await stop_harness(h)


async def test_health_recovers_by_itself_once_the_database_is_back(
    desk: Harness, break_messages_table
) -> None:

    break_messages_table(True)
    assert (await desk.send_raw(mail_bytes()))[0] == 451
    assert (await health(desk))[0] == 503
    break_messages_table(False)
    desk.advance(1.2)  # a probe row commits, but real mail failed only just now
    assert (await health(desk))[0] == 503
    desk.advance(10)  # no new mail since: the probe finds the database writable
    assert await health(desk) == (200, "ok")


async def test_a_probe_that_fits_on_a_nearly_full_disk_is_no_proof(small_disk: Path) -> None:
    """The probe's small row commits where real mail does not: while real mail has just
    failed, health stays 503 (it once turned ok and every message still got 451)."""
    h = await start_harness(small_disk, db_url=f"sqlite+aiosqlite:///{small_disk / 'd.db'}")
    try:
        big = mail_bytes(body="x" * 400_000 + "\r\n")
        assert (await h.send_raw(big))[0] == 250
        filler = fill(small_disk)
        os.truncate(filler, os.path.getsize(filler) - 96 * 1024)  # room for a small row
        assert (await h.send_raw(big.replace(b"<m1@", b"<m2@")))[0] == 451
        h.advance(1.2)
        status, reason = await health(h)
        assert status == 503 and "intake cannot commit" in reason
        assert h.daemon.committer.last_failure is not None
        assert (await h.send_raw(big.replace(b"<m1@", b"<m3@")))[0] == 451
        h.advance(1.2)
        assert (await health(h))[0] == 503
    finally:
        await stop_harness(h)


# -- issue 8, item 5: every check with its figures and a threshold that turns it 503 --


async def checks(h: Harness) -> tuple[int, dict]:
    async with h.http.get(h.base_url + "/healthz") as resp:
        return resp.status, await resp.json()


async def test_health_reports_each_check_with_its_threshold(desk: Harness) -> None:
    status, body = await checks(desk)
    assert status == 200 and body["status"] == "ok"
    c = body["checks"]
    assert c["database"]["ok"] and c["listeners"] == {"ok": True, "smtp": True, "http": True}
    assert c["relay"]["ok"] and c["relay"]["last_success_seconds_ago"] is None
    assert c["outbox"]["backlog"] == 0 and c["outbox"]["max_backlog"] == 1000
    assert c["classifier"]["backlog"] == 0 and c["classifier"]["max_oldest_seconds"] == 600.0
    await desk.send()
    await desk.drain()  # the link and the staff copy reach the relay
    status, body = await checks(desk)
    assert status == 200
    assert body["checks"]["relay"]["last_success_seconds_ago"] is not None


async def test_a_relay_down_for_longer_than_its_threshold_turns_health_503(
    backend: str, tmp_path: Path
) -> None:
    from tests.conftest import harness_on

    async with harness_on(backend, tmp_path, health={"relay_failing_max_seconds": 60}) as h:
        port = h.relay.port
        await h.relay.stop()
        await h.send()
        await h.drain()  # connection refused: deferred
        status, body = await checks(h)
        relay = body["checks"]["relay"]
        assert status == 200 and relay["last_failure_seconds_ago"] is not None
        assert "Connect" in relay["last_error"] or "refused" in relay["last_error"]
        h.advance(61)
        status, body = await checks(h)
        assert status == 503 and "relay failing for 61 s" in body["status"]
        assert body["checks"]["relay"]["ok"] is False
        await h.relay.start(port=port)
        await h.drain()  # the retries are due: the relay accepts them
        status, body = await checks(h)
        assert status == 200, body
        assert body["checks"]["relay"]["last_success_seconds_ago"] == 0


async def test_outbox_backlog_and_age_beyond_their_thresholds_turn_health_503(
    backend: str, tmp_path: Path
) -> None:
    from tests.conftest import harness_on

    limits = {"outbox_backlog_max": 1, "outbox_oldest_max_seconds": 120}
    async with harness_on(backend, tmp_path, health=limits) as h:
        await h.relay.stop()
        await h.send()
        await h.drain()  # the link and the staff copy wait for the relay
        status, body = await checks(h)
        outbox = body["checks"]["outbox"]
        assert outbox["backlog"] == 2 and set(outbox["by_kind"]) == {"auth_request", "staff"}
        assert status == 503 and "outbox backlog 2 > 1" in body["status"]
        assert "oldest outbox mail" not in body["status"]
        h.advance(121)
        status, body = await checks(h)
        assert "oldest outbox mail waits 121 s" in body["status"]
        assert body["checks"]["outbox"]["oldest_seconds"] == 121


async def test_mail_waiting_for_classification_beyond_its_thresholds_turns_health_503(
    backend: str, tmp_path: Path
) -> None:
    from tests.conftest import harness_on

    limits = {"classifier_backlog_max": 1, "classifier_oldest_max_seconds": 30}
    async with harness_on(backend, tmp_path, health=limits) as h:
        await h.send()  # stored, not yet classified (no drain)
        status, body = await checks(h)
        assert status == 200 and body["checks"]["classifier"]["backlog"] == 1
        await h.send(subject="Drugie")
        status, body = await checks(h)
        assert status == 503 and "classifier backlog 2 > 1" in body["status"]
        h.advance(31)
        status, body = await checks(h)
        assert "oldest unclassified message waits 31 s" in body["status"]
        await h.drain()
        status, body = await checks(h)
        assert status == 200 and body["checks"]["classifier"]["backlog"] == 0
