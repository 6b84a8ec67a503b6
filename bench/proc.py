"""Ports, subprocesses and CPU accounting (Linux /proc), shared by every module."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A run could not be set up or did not complete correctly."""


class MissingTool(BenchError):
    """A program the benchmark needs is not installed."""


POSTFIX_HINT = (
    "install Postfix's test tools (Debian/Ubuntu package 'postfix'; the MTA itself is "
    "never started): echo 'postfix postfix/main_mailer_type select No configuration' | "
    "debconf-set-selections && apt-get install -y postfix"
)


def find_tool(name: str) -> str:
    """A program from PATH or the sbin directories, where Postfix puts its tools."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise MissingTool(f"{name} not found; {POSTFIX_HINT}")


def free_ports(count: int) -> list[int]:
    """Distinct ports free right now on the loopback (all bound at once, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_smtp(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Until the port greets with 220; fails early if the server process died."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"server exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=2) as s:
                s.settimeout(2)
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    return
                last = f"greeting {greeting[:60]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise BenchError(f"port {port} not ready after {timeout:.0f}s ({last})")


def stop(proc: subprocess.Popen[bytes], grace: float = 20.0) -> tuple[int, float]:
    """SIGTERM, wait (bounded), SIGKILL if needed; (exit status, seconds it took)."""
    start = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode, time.monotonic() - start


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Live child processes, recursively (a daemon may run workers as processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process, its live descendants and its reaped children."""
    total = 0.0
    for p in (pid, *descendants(pid)):
        fields = _stat(p)
        if fields is not None:  # utime stime cutime cstime
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK
    return total


def loadavg() -> float | None:
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return None
