"""The README's first command: `iqmaild demo` shows an authorization mail."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    ports = [str(_free_port()) for _ in range(3)]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "iqmaild.cli",
            "demo",
            "--dir",
            str(tmp_path / "demo"),
            "--smtp-port",
            ports[0],
            "--http-port",
            ports[1],
            "--relay-port",
            ports[2],
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_demo_shows_an_authorization_mail(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--exit-after-sample")
    assert result.returncode == 0, result.stderr
    assert "authorization link: http://127.0.0.1:" in result.stderr
    mails = sorted((tmp_path / "demo" / "mail").glob("*.eml"))
    texts = [m.read_text(encoding="utf-8", errors="replace") for m in mails]
    auth = [t for t in texts if "/authorize/" in t]
    assert len(auth) == 1 and "To: klient@example.com" in auth[0]
    assert "[IQ.pl#23328]" in auth[0]  # the code comes only after the click
    # Running it again (other ports) reuses the demo directory and numbers on.
    again = _demo(tmp_path, "--exit-after-sample")
    assert again.returncode == 0, again.stderr
    assert "[IQ.pl#23329]" in "".join(
        m.read_text(errors="replace") for m in (tmp_path / "demo" / "mail").glob("*.eml")
    )


def test_demo_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "iqmaild.cli",
                "demo",
                "--dir",
                str(tmp_path / "d"),
                "--relay-port",
                port,
                "--exit-after-sample",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "cannot start the demo" in result.stderr
