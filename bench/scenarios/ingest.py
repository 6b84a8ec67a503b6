"""Ingest: how fast ``iqmaild serve`` answers 250 (each after its commit).

Load, identical for every target, one message per connection, all from one
primary address: by default the benchmark's asyncio client with realistic MIME
mail that declares ``SIZE=`` in MAIL FROM as Postfix does (``--load client``);
or Postfix's ``smtp-source -c -l SIZE -m N -s SESSIONS`` (``--load smtp-source``:
cheaper, but it never declares SIZE, and a daemon that reserves memory for
undeclared sizes defers it at 20 sessions). Targets, each started fresh for every
repetition (repetitions interleaved across targets):

- smtp-sink (C; the ceiling of load generator and loopback),
- the bare aiosmtpd sink (the denominator: what the SMTP library costs),
- iqmaild with its default group commit, on each back end asked for (a fresh
  database copy per run, a throwaway smtp-sink as its relay). Its classifier
  and outbox run as they do in production, on the backlog the load leaves.

Rate = messages / seconds from the first MAIL FROM to the last 250 (client), or
of the whole smtp-source run; every message must get a 250. After each iqmaild
run ``message list`` must show one row per accepted message. Target: >= 0.8x
the bare aiosmtpd sink.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench import baselines, load, mail, proc, report
from bench import daemon as dmn
from bench.directory import primary
from bench.scenarios import common
from bench.scenarios.common import RunRecord, Settings, Workspace

NAME = "ingest"
SIZES = (2048, 10240, 1048576)
FULL_COUNT = {2048: 2000, 10240: 2000, 1048576: 100}
SHORT_COUNT = {2048: 40, 10240: 40, 1048576: 4}


def params(s: Settings) -> dict[str, Any]:
    sizes = tuple(s.extra.get("sizes") or SIZES)
    counts = SHORT_COUNT if s.short else FULL_COUNT
    messages = {
        size: s.extra.get("messages") or counts.get(size, 100 if size > 100_000 else 2000)
        for size in sizes
    }
    return {
        "sizes": sizes,
        "messages": messages,
        "sessions": s.extra.get("sessions") or (5 if s.short else 20),
        "repeat": s.repeats(3),
        "gc1": bool(s.extra.get("gc1")),
        "load": s.extra.get("load") or "client",
    }


def drive(port: int, size: int, n: int, p: dict[str, Any]) -> load.SourceRun:
    """One timed load of ``n`` messages of ``size`` bytes, as ``p['load']`` says."""
    if p["load"] == "smtp-source":
        return load.run_smtp_source(port, n, p["sessions"], size, primary(0), dmn.DESK)
    messages = [
        mail.build(
            index=i,
            run=f"ingest{size}",
            kind="new",
            sender=primary(0),
            subject=mail.subject_for(i),
            size=size,
        )
        for i in range(n)
    ]
    sent = asyncio.run(load.send_closed(port, messages, sessions=p["sessions"]))
    first, last = common.window(sent)
    failed = [x for x in sent if not x.ok]
    error = f"{len(failed)} of {n} not accepted, first: {failed[0].reply[:200]}" if failed else ""
    return load.SourceRun(n - len(failed), last - first, first, error)


def _measure_sink(sink_cls: type, size: int, n: int, p: dict[str, Any], record: RunRecord) -> None:
    with sink_cls() as sink:
        cpu0 = sink.cpu_seconds()
        result = drive(sink.port, size, n, p)
        record.values["cpu_seconds"] = sink.cpu_seconds() - cpu0
    _store(result, record)


def _store(result: load.SourceRun, record: RunRecord) -> None:
    if result.error:
        record.problems.append(result.error)
    record.values.update(messages=result.accepted, seconds=result.seconds, rate=result.rate)


def _measure_daemon(
    ws: Workspace,
    template: Any,
    label: str,
    size: int,
    n: int,
    p: dict[str, Any],
    options: dmn.Options,
    record: RunRecord,
) -> None:
    run_dir = ws.run_dir(label)
    db = template.clone(run_dir)
    record.workdir = str(run_dir)
    ok = False
    try:
        with baselines.SmtpSink() as relay:
            d = dmn.Daemon(run_dir, db, relay.port, options)
            try:
                d.start()
                cpu0 = d.cpu_seconds()
                result = drive(d.smtp_port, size, n, p)
                record.values["cpu_seconds"] = d.cpu_seconds() - cpu0
                _store(result, record)
            finally:
                exit_info = d.stop()
        record.checks["daemon_exit"] = exit_info
        if exit_info.get("status") != 0:
            record.problems.append(f"iqmaild serve exited {exit_info.get('status')} on SIGTERM")
        if exit_info.get("error_lines"):
            record.problems.append(f"{exit_info['error_lines']} error lines in the daemon log")
        rows, problems = dmn.check_stored(d.cli, result.accepted)
        record.problems += problems
        record.checks["stored"] = len(rows)
        record.checks["classified_during_load"] = sum(
            1 for r in rows if r.get("state") == "processed"
        )
        ok = not record.problems
    finally:
        ws.release(db, keep=not ok)


def targets(s: Settings, p: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) in the order they run and print."""
    out = [("smtp-sink", baselines.SmtpSink.label), ("aiosmtpd", baselines.AiosmtpdSink.label)]
    for b in s.backends:
        out.append((f"iqmaild-{b}", f"**iqmaild {b}, group commit (default)**"))
        if p["gc1"]:
            out.append((f"iqmaild-{b}-gc1", f"iqmaild {b}, 1 commit/message"))
    return out


def run(s: Settings) -> report.Report:
    p = params(s)
    rep = report.Report(
        NAME,
        params={
            "sizes": ",".join(map(str, p["sizes"])),
            "messages": ",".join(map(str, p["messages"].values())),
            "sessions": p["sessions"],
            "repeat": p["repeat"],
            "backends": ",".join(s.backends),
            "load": "smtp-source -c -l SIZE -m N -s SESSIONS"
            if p["load"] == "smtp-source"
            else "asyncio client, realistic MIME, SIZE declared",
        },
    )

    ws = Workspace(NAME, s.keep)
    records: dict[tuple[int, str], list[RunRecord]] = {}
    try:
        templates = {b: ws.template(b, accounts=1) for b in s.backends}
        for r in range(1, p["repeat"] + 1):
            for size in p["sizes"]:
                n = p["messages"][size]
                for key, _ in targets(s, p):
                    record = RunRecord(f"{key}-{size}-r{r}")
                    record.checks["loadavg_before"] = proc.loadavg()
                    try:
                        if key == "smtp-sink":
                            _measure_sink(baselines.SmtpSink, size, n, p, record)
                        elif key == "aiosmtpd":
                            _measure_sink(baselines.AiosmtpdSink, size, n, p, record)
                        else:
                            backend = key.split("-")[1]
                            opts = s.options(group_commit_max=1 if key.endswith("gc1") else None)
                            _measure_daemon(
                                ws,
                                templates[backend],
                                record.label,
                                size,
                                n,
                                p,
                                opts,
                                record,
                            )
                    except proc.BenchError as exc:
                        record.problems.append(str(exc))
                    records.setdefault((size, key), []).append(record)
                    v = record.values
                    common.say(
                        s,
                        f"  {record.label:28s} {v.get('rate', 0):9.0f}/s  "
                        + ("ok" if not record.problems else "FAILED: " + record.problems[0][:200]),
                    )
        for size in p["sizes"]:
            _table(rep, records, s, p, size)
    finally:
        rep.runs = [r.as_dict() for rs in records.values() for r in rs]
        rep.problems += [
            f"{r.label}: {x}" for rs in records.values() for r in rs for x in r.problems
        ]
        ws.close(rep.ok)
        if not rep.ok:
            rep.notes.append(ws.kept_note())
    rep.notes.append(
        "server CPU: the server's process tree during the load, as a share of one core. "
        "Target: iqmaild >= 0.8× the bare aiosmtpd sink."
    )
    return rep


def _table(
    rep: report.Report,
    records: dict[tuple[int, str], list[RunRecord]],
    s: Settings,
    p: dict[str, Any],
    size: int,
) -> None:
    def rate(key: str) -> float | None:
        return report.median(
            [r.values["rate"] for r in records.get((size, key), []) if not r.problems]
        )

    base, sink = rate("aiosmtpd"), rate("smtp-sink")
    label = f"{size // 1024} KB" if size < 1 << 20 else f"{size / (1 << 20):g} MB"
    t = rep.table(
        f"ingest, {label} messages (median of {p['repeat']})",
        [
            "target",
            "msgs",
            "seconds",
            "msgs/s",
            "vs aiosmtpd",
            "vs smtp-sink",
            "server CPU",
            "range msgs/s",
        ],
    )
    for key, name in targets(s, p):
        good = [r for r in records.get((size, key), []) if not r.problems]
        rates = [r.values["rate"] for r in good]
        seconds = report.median([r.values["seconds"] for r in good])
        cpu = report.median(
            [r.values["cpu_seconds"] / r.values["seconds"] for r in good if r.values.get("seconds")]
        )
        failed = len(records.get((size, key), [])) - len(good)
        t.add(
            name + (f" ({failed} FAILED)" if failed else ""),
            p["messages"][size],
            report.fmt(seconds, ".2f"),
            report.fmt(report.median(rates), ".0f"),
            report.fmt(report.ratio(report.median(rates), base), ".2f", "×"),
            report.fmt(report.ratio(report.median(rates), sink), ".2f", "×"),
            report.fmt(None if cpu is None else 100 * cpu, ".0f", " %"),
            report.spread(rates),
        )
        if key.startswith("iqmaild"):
            rep.results[f"{key}_{size}_vs_aiosmtpd"] = report.ratio(report.median(rates), base)
            rep.results[f"{key}_{size}_rate"] = report.median(rates)
    rep.results[f"aiosmtpd_{size}_rate"] = base
