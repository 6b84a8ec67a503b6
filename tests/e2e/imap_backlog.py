"""By hand, not in the suite: a backlog in a Dovecot INBOX taken by ``iqmaild serve``.

    python -m tests.e2e.imap_backlog 5000        # messages (about 1.6 kB each)
    python -m tests.e2e.imap_backlog 1000 8000   # ... with 8,000 body lines (200 kB)

Delivers the backlog over Dovecot's LMTP before the daemon starts (relay: an
aiosmtpd sink), then prints one JSON line: seconds from the IMAP session's
start to the last stored batch, the last verdict and the last filing, the
batches, and the peak RSS (VmHWM) of the daemon and its worker.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.e2e.imap_desk import Box, add_user, all_events, deliver, imap_daemon, stored
from tests.e2e.mail import new_mail
from tests.e2e.servers import DeskDaemon, Dovecot, free_ports, port_open, wait_until


def _hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def main(count: int, lines: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="iqimapbacklog-"))
    root.chmod(0o711)
    dovecot = Dovecot(root / "dovecot")
    dovecot.start()
    sink = None
    try:
        user = "backlog@desk.test"
        add_user(dovecot, user)
        senders = ["owner@acme.test", "stranger@unknown.test", "dev@partner.test"]
        body = "Dzień dobry,\n" + "linia tekstu zgłoszenia\n" * lines
        msgs = [new_mail(senders[i % 3], f"Backlog {i}", body=body) for i in range(count)]
        size = sum(len(m.as_bytes()) for m in msgs)
        for start in range(0, count, 500):
            deliver(dovecot, user, msgs[start : start + 500])
        del msgs
        (sink_port,) = free_ports(1)
        sink = subprocess.Popen(
            [sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink",
             "-l", f"127.0.0.1:{sink_port}"]
        )  # fmt: skip
        wait_until(lambda: port_open(sink_port), 20, "the SMTP sink")
        template = DeskDaemon(root / "template", relay_port=25).db_path
        daemon = imap_daemon(root / "iqmaild", dovecot, user, template, batch_size=50)
        daemon.set_relay(sink_port)
        box = Box(dovecot, user)
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        peak = {"daemon": 0, "worker": 0}

        def done() -> bool:
            peak["daemon"] = max(peak["daemon"], _hwm(pid))
            for child in _children(pid):
                peak["worker"] = max(peak["worker"], _hwm(child))
            con = sqlite3.connect(f"file:{daemon.db_path}?mode=ro", uri=True, timeout=30)
            try:
                left = con.execute("SELECT count(*) FROM imap_filing").fetchone()[0]
                taken = con.execute(
                    "SELECT count(*) FROM messages WHERE channel = 'imap'"
                ).fetchone()[0]
            finally:
                con.close()
            return bool(taken >= count and left == 0 and box.count("INBOX") == 0)

        wait_until(done, 3600, "the backlog filed", interval=1.0)
        events = all_events(daemon)

        def ts(e: dict[str, Any]) -> float:
            return datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()

        def last(name: str) -> float:
            return round(ts([e for e in events if e["event"] == name][-1]) - ts(connected), 1)

        connected = next(e for e in events if e["event"] == "imap.connected")
        batches = [e for e in events if e["event"] == "imap.batch"]
        counts = stored(daemon.db_path)
        result = {
            "messages": count,
            "backlog_mb": round(size / 1e6, 1),
            "stored": len(counts),
            "max_copies": max(counts.values()),
            "batches": len(batches),
            "max_batch": max(b["messages"] for b in batches),
            "stored_all_s": last("imap.batch"),
            "classified_all_s": last("message.classified"),
            "filed_all_s": last("imap.filed"),
            "peak_rss_kib": peak,
        }
        box.close()
        daemon.close()
        return result
    finally:
        if sink is not None:
            sink.terminate()
        dovecot.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    started = time.monotonic()
    args = [int(a) for a in sys.argv[1:3]]
    out = main(args[0] if args else 5000, args[1] if len(args) > 1 else 40)
    out["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(out))
