"""Out of file descriptors, the daemon keeps answering and logs it once per interval
(issue 5, item 9: ~1,000 idle connections exhausted the fds and wrote 1.4 million
log lines in 130 s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from iqmaild.deliver.capture import CaptureRelay
from tests.harness import serve_config
from tests.test_durability import _free_port, _wait


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


async def test_a_connection_flood_neither_stops_the_daemon_nor_floods_the_log(
    tmp_path: Path,
) -> None:
    relay = CaptureRelay()
    relay_port = await relay.start()
    smtp_port, http_port = _free_port(), _free_port()
    conf = tmp_path / "f.toml"
    await serve_config(conf, relay_port, smtp_port, http_port, smtp={"max_connections": 500})
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), "serve"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=_limit_fds,  # a hard limit of 64: serve cannot raise it
        )
    flood: list[socket.socket] = []
    try:

        async def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", smtp_port), timeout=0.2):
                    return True
            except OSError:
                return False

        await _wait(up)
        for _ in range(150):  # far more than the daemon has descriptors
            try:
                flood.append(socket.create_connection(("127.0.0.1", smtp_port), timeout=1))
            except OSError:
                break

        def keep_knocking(seconds: float) -> None:  # new connections all the while
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                with contextlib.suppress(OSError):
                    socket.create_connection(("127.0.0.1", smtp_port), timeout=0.2).close()
                time.sleep(0.005)

        await asyncio.to_thread(keep_knocking, 4.0)
        for sock in flood:
            sock.close()
        flood.clear()
        await asyncio.sleep(1.5)  # asyncio resumes accepting a second after EMFILE

        def healthz() -> bytes:
            with socket.create_connection(("127.0.0.1", http_port), timeout=5) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(100)

        assert (await asyncio.to_thread(healthz)).startswith(b"HTTP/1.1 200")
        assert proc.poll() is None
    finally:
        for sock in flood:
            sock.close()
        proc.terminate()
        proc.wait(timeout=30)
        await relay.stop()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    errors = [line for line in lines if "out of system resource" in json.dumps(line)]
    assert errors, "the exhaustion is reported"
    # asyncio retries accept() every second; once per 10 s is enough to know.
    assert len(errors) == 1 and len(lines) < 10, [line["event"] for line in lines]
