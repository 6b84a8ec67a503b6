"""Soak: is the daemon bounded over time? RSS across 100,000 processed messages.

One daemon runs the whole time. The messages go in chunks (default 20 of 5,000):
each chunk is new tickets from accounts not used before (so no rate limit ever
holds a mail back), sent by the asyncio client, and the chunk counts as done when
every authorization mail and staff copy reached the capture relay. After each
chunk the resident set size of the daemon and of every process it runs (the
worker) is read from ``/proc/PID/status`` (VmRSS, and VmHWM for the peak).

Result: RSS after each chunk, and the growth from the first chunk (the warm state:
caches filled, the allocator at its working size) to the last; target < 10 %
(issue 8). The rate per chunk shows whether the daemon slows down as its tables
grow. No baseline is needed: the measure is the daemon against itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench import daemon as dmn
from bench import expect, proc, report
from bench.load import send_closed
from bench.scenarios import common
from bench.scenarios.common import RunRecord, Settings, Workspace

NAME = "soak"


def params(s: Settings) -> dict[str, Any]:
    messages = s.extra.get("messages") or (60 if s.short else 100_000)
    chunks = 3 if s.short else 20
    return {
        "messages": messages,
        "chunks": chunks,
        "chunk": max(1, messages // chunks),
        "sessions": s.extra.get("sessions") or (5 if s.short else 20),
        "size": 2048,
    }


def _kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss(pid: int) -> dict[str, int]:
    """KiB resident now and at peak, for the daemon and its process tree."""
    pids = [pid, *proc.descendants(pid)]
    return {
        "main_kib": _kib(pid, "VmRSS"),
        "tree_kib": sum(_kib(p, "VmRSS") for p in pids),
        "main_peak_kib": _kib(pid, "VmHWM"),
        "tree_peak_kib": sum(_kib(p, "VmHWM") for p in pids),
        "processes": len(pids),
    }


async def _measure(
    d: dmn.Daemon, relay: Any, record: RunRecord, s: Settings, p: dict[str, Any]
) -> None:
    rows: list[dict[str, Any]] = []
    for c in range(p["chunks"]):
        first = c * p["chunk"]
        messages = common.new_tickets("soak", first, p["chunk"], p["size"], first_index=first)
        ledger = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
        common.expect_new(ledger, messages)
        t0 = time.time()
        cpu0 = d.cpu_seconds()
        sent = await send_closed(d.smtp_port, messages, sessions=p["sessions"])
        done = await common.wait_for(relay, ledger, max(300.0, p["chunk"] / 5))
        elapsed = time.time() - t0
        common.check_sent(sent, record)
        if not done:
            record.problems += ledger.problems()[:5]
            break
        relay.spool.items.clear()  # the bench itself stays bounded too
        row = {
            "chunk": c + 1,
            "processed": first + p["chunk"],
            "seconds": round(elapsed, 2),
            "rate": round(p["chunk"] / elapsed, 1),
            "cpu_ms_per_message": round(1000 * (d.cpu_seconds() - cpu0) / p["chunk"], 2),
            **rss(d.pid),
        }
        rows.append(row)
        common.say(
            s,
            f"  chunk {row['chunk']:3d}: {row['processed']:7d} processed, "
            f"{row['rate']:6.1f} msg/s, RSS main {row['main_kib'] / 1024:6.1f} MiB, "
            f"tree {row['tree_kib'] / 1024:6.1f} MiB",
        )
    record.values["chunks"] = rows


def run(s: Settings) -> report.Report:
    p = params(s)
    rep = report.Report(NAME, params={**p, "backends": ",".join(s.backends)})
    ws = Workspace(NAME, s.keep)
    records: list[RunRecord] = []
    try:
        for backend in s.backends:
            # every message its own account: written by the bulk loader (fast at 10^5)
            template = ws.template(backend, bulk_accounts=p["chunk"] * p["chunks"])
            with common.daemon_run(ws, template, f"iqmaild-{backend}", s.options()) as (
                d,
                relay,
                record,
            ):
                asyncio.run(_measure(d, relay, record, s, p))
            records.append(record)
            _table(rep, record, backend)
    finally:
        rep.runs = [r.as_dict() for r in records]
        rep.problems += [f"{r.label}: {x}" for r in records for x in r.problems]
        ws.close(rep.ok)
        if not rep.ok:
            rep.notes.append(ws.kept_note())
    return rep


def _table(rep: report.Report, record: RunRecord, backend: str) -> None:
    rows = record.values.get("chunks") or []
    t = rep.table(
        f"soak on {backend}: RSS after each chunk",
        ["after messages", "msg/s", "CPU ms/msg", "RSS main MiB", "RSS tree MiB", "peak tree MiB"],
    )
    for r in rows:
        t.add(
            r["processed"],
            r["rate"],
            r["cpu_ms_per_message"],
            f"{r['main_kib'] / 1024:.1f}",
            f"{r['tree_kib'] / 1024:.1f}",
            f"{r['tree_peak_kib'] / 1024:.1f}",
        )
    if len(rows) >= 2:
        growth = rows[-1]["tree_kib"] / rows[0]["tree_kib"] - 1 if rows[0]["tree_kib"] else None
        rep.results[f"{backend}_rss_growth"] = growth
        rep.results[f"{backend}_first_rss_mib"] = rows[0]["tree_kib"] / 1024
        rep.results[f"{backend}_last_rss_mib"] = rows[-1]["tree_kib"] / 1024
        rep.results[f"{backend}_processed"] = rows[-1]["processed"]
        rep.notes.append(
            f"{backend}: RSS of the process tree after the first chunk "
            f"{rows[0]['tree_kib'] / 1024:.1f} MiB, after the last "
            f"{rows[-1]['tree_kib'] / 1024:.1f} MiB: growth "
            f"{report.fmt(None if growth is None else 100 * growth, '.1f', ' %')} "
            "(target < 10 %)"
        )
