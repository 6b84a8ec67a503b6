"""The `iqmaild` command as an operator runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DIRECTORY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "iqmaild.toml"
    path.write_text(
        f"""
[database]
url = "sqlite+aiosqlite:///{tmp_path / "d.db"}"
[smtp]
listen = "127.0.0.1:{_free_port()}"
desk_addresses = ["bok@desk.test"]
[http]
listen = "127.0.0.1:{_free_port()}"
public_url = "http://127.0.0.1:1"
[outbound]
relay = "127.0.0.1:{_free_port()}"
from = "BOK <bok@desk.test>"
staff_address = "staff@desk.test"
[tickets]
number_start = 500
[security]
secret_key = "cli-test-secret-key-0123456789abcdefgh"
""",
        encoding="utf-8",
    )
    return path


def iq(conf: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_bad_config_is_one_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[database]\nurl = "sqlite+aiosqlite:///x.db"\n[smtp]\nlisten = "nope"\n')
    for command in ("check-config", "serve", "migrate"):
        result = iq(bad, command, check=False)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "smtp" in lines[0]


def test_serve_refuses_unmigrated_database(conf: Path) -> None:
    result = iq(conf, "serve", check=False)
    assert result.returncode != 0
    assert "iqmaild migrate" in result.stderr and "Traceback" not in result.stderr


def test_directory_and_ticket_commands(conf: Path, tmp_path: Path) -> None:
    assert "config ok" in iq(conf, "check-config").stdout
    assert "revision" in iq(conf, "migrate").stdout
    iq(
        conf,
        "account",
        "add",
        "gamma",
        "--primary",
        "Boss@Gamma.test",
        "--name",
        "Gamma",
        "--lang",
        "en",
    )
    iq(conf, "address", "add", "gamma", "it@gamma.test", "--role", "technical")
    iq(conf, "service", "add", "gamma", "gamma-vps", "--name", "VPS")
    assert "shared with" in iq(conf, "share", "grant", "gamma-vps", "ops@agency.test").stdout
    assert "revoked" in iq(conf, "share", "revoke", "gamma-vps", "ops@agency.test").stdout
    bad = iq(conf, "address", "add", "nope", "x@y.test", "--role", "technical", check=False)
    assert bad.returncode != 0 and "no account nope" in bad.stderr
    assert "Traceback" not in bad.stderr

    data = tmp_path / "dir.json"
    data.write_text(json.dumps(DIRECTORY), encoding="utf-8")
    first = iq(conf, "directory", "import", str(data)).stdout
    second = iq(conf, "directory", "import", str(data)).stdout
    assert first == second  # idempotent upsert
    accounts = json.loads(iq(conf, "account", "list", "--json").stdout)
    by_id = {a["id"]: a for a in accounts}
    assert by_id["gamma"]["addresses"]["boss@gamma.test"] == "primary"
    assert by_id["acme"]["addresses"]["tech@acme.test"] == "technical"
    assert sorted(by_id["acme"]["services"]) == ["acme-mail", "acme-www"]
    assert json.loads(iq(conf, "ticket", "list", "--json").stdout) == []
    missing = iq(conf, "ticket", "show", "12345", check=False)
    assert missing.returncode != 0 and "no ticket 12345" in missing.stderr


def _send(port: int, sender: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, "bok@desk.test", subject
    msg["Message-ID"] = "<cli-test-1@client.test>"
    msg.set_content("Dzień dobry\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.send_message(msg)


def _wait_port(port: int, proc: subprocess.Popen[Any], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read() if proc.stdout else "daemon exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("daemon did not open its SMTP port")


def test_serve_logs_json_and_ticket_commands_act(conf: Path, tmp_path: Path) -> None:
    iq(conf, "migrate")
    data = tmp_path / "dir.json"
    data.write_text(json.dumps(DIRECTORY), encoding="utf-8")
    iq(conf, "directory", "import", str(data))
    text = conf.read_text()
    smtp_port = int(text.split('listen = "127.0.0.1:')[1].split('"')[0])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        _wait_port(smtp_port, proc)
        _send(smtp_port, "owner@acme.test", "Serwer nie odpowiada")
        deadline = time.monotonic() + 20
        tickets: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not tickets:
            tickets = json.loads(iq(conf, "ticket", "list", "--json").stdout)
            time.sleep(0.2)
        assert tickets and tickets[0]["number"] == 500
        assert tickets[0]["authorization"] == "pending"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    for expected in ("daemon.started", "smtp.accepted", "message.classified", "daemon.stopped"):
        assert expected in names, names
    for event in events:
        assert {"ts", "level", "event"} <= set(event)
    classified = next(e for e in events if e["event"] == "message.classified")
    assert classified["decision"] == "pending" and classified["sender_role"] == "primary"
    assert "Dzień dobry" not in out  # no message bodies in logs
    # The relay is down: the outbox keeps the mail queued, nothing is lost.
    assert "outbox.deferred" in names or "outbox.sent" not in names

    show = json.loads(iq(conf, "ticket", "show", "500", "--json").stdout)
    assert show["messages"][0]["decision"] == "pending"
    assert "Dzień dobry" in show["messages"][0]["body"]
    assert "closed" in iq(conf, "ticket", "close", "500").stdout
    assert json.loads(iq(conf, "ticket", "list", "--json").stdout)[0]["state"] == "closed"
    iq(conf, "ticket", "reopen", "500")
    iq(conf, "ticket", "set-service", "500", "acme-mail")
    assert json.loads(iq(conf, "ticket", "show", "500", "--json").stdout)["service"] == "acme-mail"
    wrong = iq(conf, "ticket", "set-service", "500", "beta-vps", check=False)
    assert wrong.returncode != 0 and "not of account acme" in wrong.stderr
    body = tmp_path / "reply.txt"
    body.write_text("Dzień dobry,\nsprawdziliśmy serwer.\n", encoding="utf-8")
    assert "queued" in iq(conf, "ticket", "reply", "500", "--body-file", str(body)).stdout
    outbox = json.loads(iq(conf, "outbox", "list", "--json").stdout)
    kinds = {o["kind"] for o in outbox}
    assert {"staff", "auth_request", "staff_reply"} <= kinds
    assert all(o["state"] in ("queued", "sending") for o in outbox)
