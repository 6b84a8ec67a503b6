"""Directory scale: the end-to-end cost per message with 10^3, 10^5, 10^6 addresses.

For each size a template database gets the generated directory (``bench.directory``;
written by its bulk loader at every size, so that only the size differs; the JSON
import through the CLI would take over half an hour for 10^6). Each run then sends
``--messages`` new tickets (500) from primaries spread at random over the whole
directory (closed loop, 20 sessions) and waits for every authorization mail and
staff copy at the relay.

Cost per message: the daemon's CPU (process tree) per message, and wall-clock
seconds per message (the inverse of the end-to-end rate). The baseline is the
smallest directory in the same run. Target: cost at 10^6 within 1.2x of 10^3.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench import daemon as dmn
from bench import directory, expect, mail, report
from bench.load import send_closed
from bench.scenarios import common
from bench.scenarios.common import RunRecord, Settings, Workspace

NAME = "scale"
SIZES = (1_000, 100_000, 1_000_000)
SHORT_SIZES = (1_000, 10_000)


def params(s: Settings) -> dict[str, Any]:
    return {
        "addresses": tuple(s.extra.get("addresses") or (SHORT_SIZES if s.short else SIZES)),
        "messages": s.extra.get("messages") or (20 if s.short else 500),
        "sessions": s.extra.get("sessions") or (5 if s.short else 20),
        "size": 2048,
        "repeat": s.repeats(3),
    }


def senders(n_accounts: int, count: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.sample(range(n_accounts), min(count, n_accounts))


async def _measure(
    d: dmn.Daemon, relay: Any, record: RunRecord, p: dict[str, Any], n_accounts: int
) -> None:
    picks = senders(n_accounts, p["messages"], seed=n_accounts)
    messages = [
        mail.build(
            index=n,
            run="scale",
            kind="new",
            sender=directory.primary(i),
            subject=mail.subject_for(i),
            size=p["size"],
        )
        for n, i in enumerate(picks)
    ]
    ledger = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
    common.expect_new(ledger, messages)
    cpu0 = d.cpu_seconds()
    sent = await send_closed(d.smtp_port, messages, sessions=p["sessions"])
    done = await common.wait_for(relay, ledger, max(180.0, len(messages) / 5))
    cpu1 = d.cpu_seconds()
    common.check_sent(sent, record)
    record.problems += ledger.problems()
    last = ledger.last_arrival()
    if done and last is not None:
        first, _ = common.window(sent)
        n = len(messages)
        record.values.update(
            messages=n,
            seconds=last - first,
            rate=n / (last - first),
            ms_per_message=1000 * (last - first) / n,
            cpu_ms_per_message=1000 * (cpu1 - cpu0) / n,
        )
    record.checks["accepted"] = len(messages)


def run(s: Settings) -> report.Report:
    p = params(s)
    rep = report.Report(
        NAME,
        params={
            **p,
            "addresses": ",".join(map(str, p["addresses"])),
            "backends": ",".join(s.backends),
            "loader": "bench.directory.bulk_load",
        },
    )
    ws = Workspace(NAME, s.keep)
    records: dict[tuple[str, int], list[RunRecord]] = {}
    facts: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        templates = {}
        for backend in s.backends:
            for size in p["addresses"]:
                n_accounts = directory.accounts_for_addresses(size)
                t0 = time.monotonic()
                templates[backend, size] = ws.template(backend, bulk_accounts=n_accounts)
                facts[backend, size] = {
                    "accounts": n_accounts,
                    "addresses": directory.address_count(n_accounts),
                    "load_seconds": round(time.monotonic() - t0, 1),
                }
                common.say(
                    s,
                    f"scale: {backend} directory of {facts[backend, size]['addresses']}"
                    f" addresses loaded in {facts[backend, size]['load_seconds']}s",
                )
        for r in range(1, p["repeat"] + 1):
            for backend in s.backends:
                for size in p["addresses"]:
                    label = f"iqmaild-{backend}-{size}-r{r}"
                    with common.daemon_run(ws, templates[backend, size], label, s.options()) as (
                        d,
                        relay,
                        record,
                    ):
                        asyncio.run(_measure(d, relay, record, p, facts[backend, size]["accounts"]))
                        if not record.problems:
                            common.check_daemon_state(d, record, record.checks["accepted"])
                    records.setdefault((backend, size), []).append(record)
                    v = record.values
                    common.say(
                        s,
                        f"  {label:30s} {v.get('cpu_ms_per_message', 0):6.2f} CPU ms/msg "
                        f"{v.get('rate', 0):7.1f}/s  "
                        + ("ok" if not record.problems else "FAILED: " + record.problems[0][:200]),
                    )
        _tables(rep, records, facts, s, p)
    finally:
        rep.runs = [r.as_dict() for rs in records.values() for r in rs]
        rep.problems += [
            f"{r.label}: {x}" for rs in records.values() for r in rs for x in r.problems
        ]
        ws.close(rep.ok)
        if not rep.ok:
            rep.notes.append(ws.kept_note())
    return rep


def _tables(
    rep: report.Report,
    records: dict[tuple[str, int], list[RunRecord]],
    facts: dict[tuple[str, int], dict[str, Any]],
    s: Settings,
    p: dict[str, Any],
) -> None:
    for backend in s.backends:
        t = rep.table(
            f"directory scale, iqmaild {backend}: {p['messages']} new tickets per run "
            f"(median of {p['repeat']})",
            [
                "addresses",
                "accounts",
                "loaded in",
                "msgs/s",
                "ms/msg (wall)",
                "× smallest",
                "CPU ms/msg",
                "× smallest",
                "range CPU ms/msg",
            ],
        )
        base_wall = base_cpu = None
        for size in p["addresses"]:
            good = [r for r in records.get((backend, size), []) if "rate" in r.values]
            wall = report.median([r.values["ms_per_message"] for r in good])
            cpu = report.median([r.values["cpu_ms_per_message"] for r in good])
            if base_wall is None:
                base_wall, base_cpu = wall, cpu
            f = facts[backend, size]
            t.add(
                f"{f['addresses']:,}",
                f"{f['accounts']:,}",
                f"{f['load_seconds']} s",
                report.fmt(report.median([r.values["rate"] for r in good]), ".1f"),
                report.fmt(wall, ".2f"),
                report.fmt(report.ratio(wall, base_wall), ".2f", "×"),
                report.fmt(cpu, ".2f"),
                report.fmt(report.ratio(cpu, base_cpu), ".2f", "×"),
                report.spread([r.values["cpu_ms_per_message"] for r in good], ".2f"),
            )
            rep.results[f"{backend}_{size}_cpu_ms"] = cpu
            rep.results[f"{backend}_{size}_wall_ms"] = wall
            rep.results[f"{backend}_{size}_cpu_vs_smallest"] = report.ratio(cpu, base_cpu)
    rep.notes.append(
        "Target: cost at 10^6 addresses within 1.2× of 10^3. The directory rows "
        "are written by bench.directory.bulk_load (checked against the CLI import "
        "by tests/bench)."
    )
