"""The daemon as systemd runs it (issue 8, item 3), against the real `iqmaild serve`.

There is no systemd as PID 1 here, so the tests play its part: they create the
notification socket themselves and hand it over as ``$NOTIFY_SOCKET`` with
``WATCHDOG_USEC``, as systemd does for ``Type=notify`` and ``WatchdogSec=``, and
send the signals that ``systemctl reload`` and ``stop`` send.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from iqmaild.config import parse_config
from iqmaild.deliver.capture import CaptureRelay
from iqmaild.rendering import shipped_templates_dir
from tests.harness import DESK, Harness, config_dict, parse, serve_config, to_toml
from tests.ingest.test_smtp import mail_bytes
from tests.test_durability import _free_port, _wait

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "iqmaild.service"
SYSUSERS = UNIT.with_name("iqmaild.sysusers.conf")


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket, path or abstract."""

    def __init__(self, path: Path | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"iqmaild-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            self.sock.bind(str(path))
            self.env = str(path)
        self.sock.setblocking(False)
        self.received: list[dict[str, str]] = []
        self.seen = 0  # wait_for's place in `received`

    def drain(self) -> list[dict[str, str]]:
        """Every datagram that arrived since the last call, as KEY=value dicts."""
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))
        self.received += out
        return out

    async def wait_for(self, key: str, seconds: float = 30.0) -> dict[str, str]:
        """The next datagram (after the last one waited for) that carries ``key``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.drain()
            while self.seen < len(self.received):
                message = self.received[self.seen]
                self.seen += 1
                if key in message:
                    return message
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {key} in {seconds} s; got {self.received}")


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    conf: Path
    data: dict[str, Any]
    log: Path
    relay: CaptureRelay
    smtp_port: int
    http_port: int
    extra: dict[str, Any] = field(default_factory=dict)

    def log_events(self) -> list[str]:
        return re.findall(r'"event": "([^"]+)"', self.log.read_text(errors="replace"))

    def rewrite(self, **sections: dict[str, Any]) -> None:
        for name, values in sections.items():
            self.data.setdefault(name, {}).update(values)
        self.conf.write_text(to_toml(self.data), encoding="utf-8")


async def _serve(tmp_path: Path, env: dict[str, str], **sections: Any) -> Served:
    relay = CaptureRelay()
    relay_port = await relay.start()
    smtp_port, http_port = _free_port(), _free_port()
    conf = tmp_path / "s.toml"
    data = await serve_config(conf, relay_port, smtp_port, http_port, **sections)
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
        )
    return Served(proc, conf, data, log, relay, smtp_port, http_port)


async def _end(served: Served) -> int:
    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(served.proc.wait, 30)
        except subprocess.TimeoutExpired:
            served.proc.kill()
            served.proc.wait()
    await served.relay.stop()
    return served.proc.returncode


@pytest.fixture
async def notify(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[NotifySocket]:
    sock = NotifySocket(None if getattr(request, "param", "path") == "abstract" else tmp_path / "n")
    yield sock
    sock.sock.close()


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("notify", ["path", "abstract"], indirect=True)
async def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(
    tmp_path: Path, notify: NotifySocket
) -> None:
    served = await _serve(
        tmp_path,
        {
            "NOTIFY_SOCKET": notify.env,
            "WATCHDOG_USEC": "200000",  # WatchdogSec=0.2: a ping every 0.1 s
            "IQMAILD_TEST_HOOKS": "1",
            "IQMAILD_TEST_BLOCK_SECONDS": "4",
        },
    )
    try:
        ready = await notify.wait_for("READY")
        # READY only once both listeners answer and the schema was checked.
        assert _connects(served.smtp_port) and _connects(served.http_port)
        assert ready["STATUS"].startswith("backlog: 0 to classify, 0 to send")
        assert ready["MAINPID"] == str(served.proc.pid)
        await notify.wait_for("WATCHDOG")
        await notify.wait_for("WATCHDOG")

        # A stuck event loop is not fed: systemd would kill and restart it.
        served.proc.send_signal(signal.SIGUSR2)
        await _wait(lambda: _async("test.blocking_loop" in served.log_events()))
        notify.drain()
        await asyncio.sleep(1.0)  # ten intervals, all inside the four blocked seconds
        assert [m for m in notify.drain() if "WATCHDOG" in m] == []
        assert "test.loop_unblocked" not in served.log_events()
        notify.seen = len(notify.received)
        await notify.wait_for("WATCHDOG")  # the loop turns again: fed again
        assert "test.loop_unblocked" in served.log_events()

        served.proc.send_signal(signal.SIGTERM)
        stopping = await notify.wait_for("STOPPING")
        assert stopping["STOPPING"] == "1"
        assert await _end(served) == 0
    finally:
        await _end(served)


async def _async(value: bool) -> bool:
    return value


async def test_the_watchdog_is_not_fed_for_another_pid(tmp_path: Path) -> None:
    """WATCHDOG_PID names the process meant (sd_watchdog_enabled): not us, no pings."""
    notify = NotifySocket(tmp_path / "n")
    served = await _serve(
        tmp_path,
        {"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},
    )
    try:
        await notify.wait_for("READY")
        await asyncio.sleep(0.5)
        assert not [m for m in notify.drain() + notify.received if "WATCHDOG" in m]
    finally:
        await _end(served)
        notify.sock.close()


async def test_sighup_reloads_templates_and_log_level_in_both_processes_and_never_ends_them(
    tmp_path: Path, notify: NotifySocket
) -> None:
    served = await _serve(tmp_path, {"NOTIFY_SOCKET": notify.env})
    try:
        await notify.wait_for("READY")
        page = f"http://127.0.0.1:{served.http_port}/authorize/no-such-token"
        async with aiohttp.ClientSession() as http:
            async with http.get(page) as resp:
                assert resp.status == 404 and "ZMIENIONY" not in await resp.text()

            # A site template (the link page, the link mail) and a louder log level.
            override = tmp_path / "site"
            shipped = shipped_templates_dir()
            (override / "web" / "pl").mkdir(parents=True)
            (override / "mail" / "pl").mkdir(parents=True)
            error = (shipped / "web" / "pl" / "error.html").read_text(encoding="utf-8")
            (override / "web" / "pl" / "error.html").write_text("ZMIENIONY " + error)
            mail = (shipped / "mail" / "pl" / "auth_request.txt").read_text(encoding="utf-8")
            marked = re.sub(r"({% block subject %})", r"\1ZMIENIONY ", mail, count=1)
            assert marked != mail
            (override / "mail" / "pl" / "auth_request.txt").write_text(marked)
            served.rewrite(templates={"override_dir": str(override)}, logging={"level": "info"})
            worker_pids = _children(served.proc.pid)
            assert worker_pids, "the worker process runs"

            served.proc.send_signal(signal.SIGHUP)
            await notify.wait_for("RELOADING")
            await notify.wait_for("READY")
            async with http.get(page) as resp:
                assert resp.status == 404 and "ZMIENIONY" in await resp.text()
            await _wait(lambda: _async("worker.reloaded" in served.log_events()))
            # info lines appear now: the level changed (daemon.reloaded is info).
            assert "daemon.reloaded" in served.log_events()

            # The worker renders the link mail from the new template.
            from smtplib import SMTP

            with SMTP("127.0.0.1", served.smtp_port, timeout=30) as client:
                client.sendmail("owner@acme.test", [DESK], mail_bytes())
            await _wait(lambda: _async(len(served.relay.messages) >= 1))
            subjects = [str(parse(m.content)["Subject"]) for m in served.relay.messages]
            assert any("ZMIENIONY" in s for s in subjects), subjects

            # An invalid config is refused, logged, and the old one stays.
            served.conf.write_text("this is [not toml", encoding="utf-8")
            served.proc.send_signal(signal.SIGHUP)
            await _wait(lambda: _async("daemon.reload_refused" in served.log_events()))
            async with http.get(page) as resp:
                assert resp.status == 404 and "ZMIENIONY" in await resp.text()
            assert served.proc.poll() is None
            assert _children(served.proc.pid) == worker_pids  # a HUP ends no worker either
            for pid in worker_pids:  # `systemctl kill -s HUP` reaches the worker too
                os.kill(pid, signal.SIGHUP)
            await _wait(lambda: _async("worker.sighup_ignored" in served.log_events()))
            assert _children(served.proc.pid) == worker_pids
        assert await _end(served) == 0
    finally:
        await _end(served)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return sorted(int(p) for p in path.read_text().split()) if path.exists() else []


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, check=False, timeout=60
    )


def test_the_unit_verifies_cleanly(tmp_path: Path) -> None:
    """`systemd-analyze verify` with the unit's binary where the test's venv has it
    (tests/test_install.py verifies it at /opt/iqmaild after the README's install)."""
    unit = tmp_path / "iqmaild.service"
    iqmaild = Path(sys.prefix) / "bin" / "iqmaild"
    unit.write_text(UNIT.read_text().replace("/opt/iqmaild/bin/iqmaild", str(iqmaild)))
    result = _analyze("verify", str(unit))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=iqmaild",
        "RuntimeDirectory=iqmaild",
        "User=iqmaild",
    ):
        assert line in text


def test_the_unit_scores_at_most_1_5_in_systemd_analyze_security() -> None:
    result = _analyze("security", "--offline=true", "--no-pager", str(UNIT))
    match = re.search(r"Overall exposure level for iqmaild\.service: ([\d.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 1.5, result.stdout


def test_the_sysusers_file_makes_a_system_user_without_login(tmp_path: Path) -> None:
    if shutil.which("systemd-sysusers") is None:
        pytest.skip("systemd-sysusers is not installed (Debian package systemd)")
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    entry = next(
        line.split(":")
        for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
        if line.startswith("iqmaild:")
    )
    assert int(entry[2]) < 1000 and entry[6] == "/usr/sbin/nologin"
    assert entry[5] == "/var/lib/iqmaild"


async def test_a_reload_applies_new_rate_limits_and_names_what_needs_a_restart(
    desk: Harness,
) -> None:
    """What SIGHUP hands to Daemon.reload, in the test's own loop (injected clock)."""
    data = config_dict(
        desk.config.database.url,
        desk.relay.port,
        outbound={"rate_limit": {"per_recipient_10min": 1}},
        http={"authorize_attempts_per_minute": 1},
        smtp={"hostname": "renamed.test"},
    )
    report = await desk.daemon.reload(parse_config(data))
    assert {"templates", "outbound.rate_limit", "http rate limits"} <= set(report["reloaded"])
    assert report["needs_restart"] == ["smtp.hostname"]
    assert "outbound.rate_limit.per_recipient_10min" in report["changed"]

    await desk.send(subject="Pierwsze")
    await desk.send(subject="Drugie")
    await desk.drain()
    links = [m for m in desk.new_mail() if m.envelope_to == ["owner@acme.test"]]
    assert len(links) == 1  # the second link waits for the new limit
    async with desk.http.get(desk.base_url + "/metrics") as resp:
        text = await resp.text()
    assert 'iqmaild_autoreplies_suppressed_total{why="recipient_rate_limit"} 1.0' in text
    statuses = []
    for _ in range(2):
        async with desk.http.get(desk.base_url + "/authorize/nope") as resp:
            statuses.append(resp.status)
    assert statuses == [404, 429]
