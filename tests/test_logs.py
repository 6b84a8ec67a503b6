"""The daemon and its worker write JSON lines to one stdout: no line may interleave."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WRITER = """
from iqmaild import logs
logs.configure("info")
log = logs.get("iqmaild.test")
for i in range(2000):
    log.info("test.line", n=i, pad="x" * 300)
"""


def test_two_processes_sharing_stdout_never_interleave_lines(tmp_path: Path) -> None:
    out = tmp_path / "shared.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # as under systemd with Python's -u
    with out.open("ab") as sink:
        procs = [
            subprocess.Popen([sys.executable, "-c", WRITER], stdout=sink, env=env) for _ in range(2)
        ]
        for p in procs:
            assert p.wait(timeout=120) == 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4000
    events = [json.loads(line) for line in lines]  # each line whole
    assert {e["event"] for e in events} == {"test.line"}
