"""py-spy around the daemon during the measured part, summarized by library.

``python -m bench burst --profile DIR`` records the daemon's process tree
(``--subprocesses``, non-blocking, 100 Hz) while the load runs and the backlog
drains, writes the raw stacks to ``DIR/<label>.txt`` (collapsed format: feed it
to flamegraph.pl or speedscope; ``python -m bench.profile FILE`` prints the
summaries) and adds two tables to the report.

Only samples of threads that hold the GIL are kept (``--gil``): that is the
daemon's Python CPU. Idle waits (epoll, the aiosqlite thread's queue) are thus
left out (py-spy's own idle detection does not work on this VM), and so is work
done without the GIL: SQLite's C code, fsync, socket I/O. The tables:

- **by library**: each sample goes to the library of its innermost frame that
  belongs to a known library (SQLAlchemy, aiosqlite, email, asyncio, ...), i.e.
  where the CPU was spent;
- **by daemon module**: each sample goes to the innermost ``iqmaild`` module on
  its stack, i.e. which part of the daemon asked for that work.

Needs ``pip install py-spy`` and ptrace permission (root, or
``kernel.yama.ptrace_scope = 0``).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.proc import BenchError

LIBRARIES = [
    ("/sqlalchemy/", "SQLAlchemy"),
    ("/sqlalchemy generated", "SQLAlchemy"),
    ("/aiosqlite/", "aiosqlite (incl. sqlite3 calls)"),
    ("/asyncpg/", "asyncpg"),
    ("/email/", "email (stdlib)"),
    ("/aiosmtpd/", "aiosmtpd"),
    ("/aiosmtplib/", "aiosmtplib"),
    ("/aiohttp/", "aiohttp"),
    ("/jinja2/", "Jinja2"),
    ("/structlog/", "logging (structlog, json)"),
    ("/json/", "logging (structlog, json)"),
    ("/logging/", "logging (structlog, json)"),
    ("/alembic/", "alembic"),
    ("/iqmaild/core/", "iqmaild.core (the pure rules)"),
    ("/asyncio/", "asyncio"),
    ("/iqmaild/", "iqmaild (own code, not core)"),
]
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise BenchError("py-spy not found: pip install py-spy")
    return found


class Profiler:
    def __init__(self, pid: int, out_dir: Path, label: str, rate: int = 100) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / f"{label}.txt"
        self.cmd = [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--gil",
            "--nonblocking",
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(self.path),
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        self.process = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            _, err = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        if not self.path.exists():
            raise BenchError(f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}")


def _path_of(frame: str) -> str:
    """The file of a frame as ``/pkg/module.py`` (py-spy shortens site-packages paths)."""
    match = _FRAME.match(frame)
    path = match.group(2) if match else frame
    return "/" + path.lstrip("</")


def summarize(path: Path) -> dict[str, Any]:
    """Sample shares by library (innermost known frame) and by innermost iqmaild module."""
    by_library: Counter[str] = Counter()
    by_module: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_path_of(f) for f in stack.split(";") if not f.startswith("process ")]
        library = "other (stdlib, C)"
        for frame in reversed(frames):
            found = next((name for key, name in LIBRARIES if key in frame), None)
            if found:
                library = found
                break
        by_library[library] += count
        module = "(no iqmaild frame: SQLAlchemy greenlet or worker thread)"
        for frame in reversed(frames):
            if "/iqmaild/" in frame:
                module = "iqmaild/" + frame.split("/iqmaild/", 1)[1]
                break
        by_module[module] += count
    return {
        "samples": total,
        "by_library": dict(by_library.most_common()),
        "by_module": dict(by_module.most_common()),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.profile FILE``: the two summaries of a raw py-spy file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    summary = summarize(args.file)
    total = summary["samples"] or 1
    for key in ("by_library", "by_module"):
        print(f"\n{key} ({summary['samples']} samples)")
        for name, n in summary[key].items():
            print(f"  {100 * n / total:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
