"""sd_notify(3) over ``$NOTIFY_SOCKET``, in a few lines of our own.

systemd's ``Type=notify`` waits for READY=1 before it calls the unit started,
shows STATUS= in ``systemctl status``, and with ``WatchdogSec=`` restarts a
daemon that stops sending WATCHDOG=1. The watchdog is fed by a task of the
event loop, never by a thread: a loop that is stuck (a blocking call, a busy
coroutine) stops feeding it, and that is exactly the daemon systemd must restart.
Without ``$NOTIFY_SOCKET`` (tests, a shell) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Mapping

ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | None:
    """A path, or ``@name`` for an abstract socket (its first byte is NUL)."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other forms systemd 252 does not hand to services


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two WATCHDOG=1 (half of ``WATCHDOG_USEC``, as sd_watchdog_enabled
    advises), or None when the watchdog is off or meant for another process."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Datagrams to the service manager; failures are swallowed (notification is advisory)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self.address = _address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog = watchdog_interval(environ, os.getpid()) if self.address else None
        self.sock: socket.socket | None = None
        if self.address is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def notify(self, **fields: str | int) -> bool:
        """``notify(READY=1, STATUS="...")``: one datagram of ``KEY=value`` lines."""
        if self.sock is None or self.address is None:
            return False
        lines = (f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        text = "\n".join(lines)
        try:
            self.sock.sendto(text.encode(), self.address)
        except OSError:
            return False
        return True

    async def feed_watchdog(self) -> None:
        """WATCHDOG=1 every half interval, for as long as the event loop turns."""
        if self.watchdog is None:
            return
        while True:
            self.notify(WATCHDOG=1)
            await asyncio.sleep(self.watchdog)

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def child_environment() -> dict[str, str]:
    """Our environment without the notification variables: only the main process
    talks to systemd (``NotifyAccess=main``), so the worker must not inherit them."""
    return {k: v for k, v in os.environ.items() if k not in ENV_VARS}
