"""The baselines every ratio is taken against, each in its own process.

- ``AiosmtpdSink``: a bare aiosmtpd server (``loop.create_server``, like the
  daemon's listener) whose ``handle_DATA`` answers 250 at once. What the SMTP
  library costs in Python before iqmaild adds anything: the denominator of every
  "vs aiosmtpd" ratio.
- ``SmtpSink``: Postfix's ``smtp-sink`` (C), which throws mail away. The ceiling
  of the load generator and the loopback on this machine.

``python -m bench.baselines HOST:PORT`` runs the aiosmtpd sink.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import proc

ROOT = Path(__file__).resolve().parent.parent


def serve_aiosmtpd(listen: str) -> None:
    from aiosmtpd.smtp import SMTP

    host, _, port = listen.rpartition(":")

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 2.0.0 Ok"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        handler = Handler()
        server = await loop.create_server(
            lambda: SMTP(
                handler,
                hostname="sink.bench.test",
                decode_data=False,
                data_size_limit=200 * 1024 * 1024,
                loop=loop,
            ),
            host=host,
            port=int(port),
        )
        await stop.wait()
        server.close()

    asyncio.run(main())


class _Server:
    """A server process on a free port; ``with X() as s: s.port, s.pid``."""

    label = ""

    def __init__(self) -> None:
        self.port = proc.free_ports(1)[0]
        self.process: subprocess.Popen[bytes] | None = None
        self._out: Any = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> _Server:
        # counters and errors go to a file: a pipe nobody reads would stall the server
        self._out = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            self.command(), stdout=self._out, stderr=subprocess.STDOUT, cwd=ROOT
        )
        proc.wait_smtp(self.port, self.process, 20)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            proc.stop(self.process, 10)
        if self._out is not None:
            self._out.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        return proc.tree_cpu_seconds(self.pid)


class AiosmtpdSink(_Server):
    label = "aiosmtpd bare (250 at once)"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.baselines", f"{proc.HOST}:{self.port}"]


class SmtpSink(_Server):
    label = "smtp-sink (Postfix, C)"

    def command(self) -> list[str]:
        cmd = [proc.find_tool("smtp-sink"), "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
        return [*cmd, f"{proc.HOST}:{self.port}", "256"]


if __name__ == "__main__":
    serve_aiosmtpd(sys.argv[1])
