"""Run a daemonizing server under a child subreaper, so its processes are reaped.

PID 1 of the CI machine is not an init that reaps orphans: ``postfix start``
and ``dovecot`` fork their master into the background, and once the master is
gone its children stay zombies forever. Run as ``python reaper.py STATUSFILE CMD
ARGS...``, this process marks itself a child subreaper (prctl
PR_SET_CHILD_SUBREAPER), runs CMD, writes CMD's exit code to STATUSFILE, and
then reaps every descendant until none is left. It exits when the server has
stopped completely, so the fixture knows the server is gone by waiting for it.

SIGTERM to this process sends SIGKILL to every descendant (the last resort of a
fixture's teardown, after the server's own stop command). So does the death of
the test run that started it (PR_SET_PDEATHSIG): a killed pytest leaves no
Postfix or Dovecot behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_all(signum: int, frame: object) -> None:
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main() -> int:
    status_file, command = sys.argv[1], sys.argv[2:]
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER) failed: errno {ctypes.get_errno()}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, kill_all)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the test run died before we asked
        return 1
    proc = subprocess.Popen(command)
    code = proc.wait()
    tmp = status_file + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{code}\n")
    os.replace(tmp, status_file)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            # Nothing left to reap; a grandchild may still be between fork and
            # reparenting, so look once more before leaving.
            time.sleep(0.05)
            if not descendants(os.getpid()):
                return 0
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main())
