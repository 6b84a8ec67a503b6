"""Burst drain: 2,000 new tickets sent as fast as possible; when is it all done?

Every message is a new ticket from another account's primary address, sent by
the asyncio client over ``--sessions`` (50) parallel sessions. Drain time = from
the first MAIL FROM until the last expected outbound mail (authorization mail
and staff copy of every message) reached the relay.

The backlog curve, on one time axis (``time.time()`` everywhere):

- received: the 250s the client got;
- classified: the daemon's ``message.classified`` log events (its stable JSON
  log; the daemon runs at the shipped ``logging.level = "info"``);
- at relay: authorization mails and staff copies, by their arrival at the relay.

The baseline is the bare aiosmtpd sink taking the same 2,000 messages from the
same client: how long the burst takes to arrive when nothing is done with it.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Any

from bench import baselines, expect, report
from bench import daemon as dmn
from bench.load import send_closed
from bench.scenarios import common
from bench.scenarios.common import RunRecord, Settings, Workspace

NAME = "burst"


def params(s: Settings) -> dict[str, Any]:
    return {
        "messages": s.extra.get("messages") or (24 if s.short else 2000),
        "sessions": s.extra.get("sessions") or (10 if s.short else 50),
        "size": 2048,
        "repeat": s.repeats(3),
    }


def _count_until(times: list[float], t: float) -> int:
    return bisect.bisect_right(times, t)


async def _measure(
    d: dmn.Daemon, relay: Any, record: RunRecord, s: Settings, p: dict[str, Any]
) -> None:
    n = p["messages"]
    messages = common.new_tickets("burst", 0, n, p["size"])
    ledger = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
    common.expect_new(ledger, messages)
    cpu0 = d.cpu_seconds()
    with common.maybe_profile(s, d, record.label, record):
        sent = await send_closed(d.smtp_port, messages, sessions=p["sessions"])
        done = await common.wait_for(relay, ledger, max(180.0, n / 5))
    cpu1 = d.cpu_seconds()
    common.check_sent(sent, record)
    record.problems += ledger.problems()
    first, last_250 = common.window(sent)
    last = ledger.last_arrival()
    if not done or last is None:
        return
    keys = {m.key for m in messages}
    received = sorted(x.done for x in sent if x.ok)
    classified = sorted(
        t for e in d.events("message.classified") if (t := dmn.log_time(e)) is not None
    )
    auth, staff = ledger.arrivals(expect.AUTH), ledger.arrivals(expect.STAFF)
    record.values.update(
        messages=n,
        drain_seconds=last - first,
        ingest_seconds=last_250 - first,
        rate=n / (last - first),
        cpu_ms_per_message=1000 * (cpu1 - cpu0) / n,
        classified_events=len(classified),
        first_auth_after=auth[0] - first if auth else None,
    )
    if classified:
        record.values["classified_done_after"] = classified[-1] - first
    step = 0.5 if last - first > 5 else 0.1
    curve = []
    t = 0.0
    while True:
        at = first + t
        curve.append(
            [
                round(t, 2),
                _count_until(received, at),
                _count_until(classified, at),
                _count_until(auth, at),
                _count_until(staff, at),
            ]
        )
        if at >= last:
            break
        t += step
    record.values["curve"] = curve
    record.values["curve_columns"] = [
        "t",
        "received",
        "classified",
        "auth_at_relay",
        "staff_at_relay",
    ]
    record.checks["all_keys"] = len(keys)


def run(s: Settings) -> report.Report:
    p = params(s)
    rep = report.Report(NAME, params={**p, "backends": ",".join(s.backends)})
    ws = Workspace(NAME, s.keep)
    records: dict[str, list[RunRecord]] = {}
    try:
        templates = {b: ws.template(b, accounts=p["messages"]) for b in s.backends}
        for r in range(1, p["repeat"] + 1):
            record = RunRecord(f"aiosmtpd-r{r}")
            msgs = common.new_tickets("burst", 0, p["messages"], p["size"])
            with baselines.AiosmtpdSink() as sink:
                sent = asyncio.run(send_closed(sink.port, msgs, sessions=p["sessions"]))
            common.check_sent(sent, record)
            first, last = common.window(sent)
            record.values.update(drain_seconds=last - first, rate=p["messages"] / (last - first))
            records.setdefault("aiosmtpd", []).append(record)
            common.say(s, f"  {record.label:24s} {record.values['drain_seconds']:7.2f}s")
            for backend in s.backends:
                label = f"iqmaild-{backend}-r{r}"
                with common.daemon_run(ws, templates[backend], label, s.options()) as (
                    d,
                    relay,
                    record,
                ):
                    asyncio.run(_measure(d, relay, record, s, p))
                    if not record.problems:
                        common.check_daemon_state(d, record, p["messages"])
                records.setdefault(backend, []).append(record)
                v = record.values
                common.say(
                    s,
                    f"  {label:24s} {v.get('drain_seconds', 0):7.2f}s  "
                    + ("ok" if not record.problems else "FAILED: " + record.problems[0][:200]),
                )
        _tables(rep, records, s, p)
        common.profile_tables(rep, [r for rs in records.values() for r in rs])
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
    rep: report.Report, records: dict[str, list[RunRecord]], s: Settings, p: dict[str, Any]
) -> None:
    base = report.median(
        [
            r.values["drain_seconds"]
            for r in records.get("aiosmtpd", [])
            if "drain_seconds" in r.values
        ]
    )
    t = rep.table(
        f"burst of {p['messages']} new tickets (median of {p['repeat']})",
        [
            "target",
            "all 250s after",
            "first auth mail after",
            "all classified after",
            "drained after",
            "drain msgs/s",
            "× the bare sink's time",
            "CPU ms/msg",
            "range drained",
        ],
    )
    t.add(
        "aiosmtpd bare (same client)",
        report.fmt(base, ".2f", " s"),
        "–",
        "–",
        report.fmt(base, ".2f", " s"),
        report.fmt(report.ratio(p["messages"], base), ".0f"),
        "1.0×",
        "–",
        "–",
    )
    for backend in s.backends:
        good = [r for r in records.get(backend, []) if "drain_seconds" in r.values]
        med = {
            k: report.median([r.values[k] for r in good if r.values.get(k) is not None])
            for k in (
                "ingest_seconds",
                "first_auth_after",
                "classified_done_after",
                "drain_seconds",
                "rate",
                "cpu_ms_per_message",
            )
        }
        t.add(
            f"**iqmaild {backend}**",
            report.fmt(med["ingest_seconds"], ".2f", " s"),
            report.fmt(med["first_auth_after"], ".2f", " s"),
            report.fmt(med["classified_done_after"], ".2f", " s"),
            report.fmt(med["drain_seconds"], ".2f", " s"),
            report.fmt(med["rate"], ".1f"),
            report.fmt(report.ratio(med["drain_seconds"], base), ".0f", "×"),
            report.fmt(med["cpu_ms_per_message"], ".2f"),
            report.spread([r.values["drain_seconds"] for r in good], ".1f"),
        )
        rep.results[f"{backend}_drain_seconds"] = med["drain_seconds"]
        rep.results[f"{backend}_drain_rate"] = med["rate"]
        if good:
            # the curve of the median run
            mid = sorted(good, key=lambda r: r.values["drain_seconds"])[len(good) // 2]
            curve = mid.values["curve"]
            c = rep.table(
                f"backlog curve, {mid.label} (cumulative counts)",
                [
                    "t (s)",
                    "received (250)",
                    "classified",
                    "auth mails at relay",
                    "staff copies at relay",
                    "backlog (received − classified)",
                ],
            )

            picks = sorted({round(i * (len(curve) - 1) / 12) for i in range(13)})
            for i in picks:
                tt, rec, cls, auth, staff = curve[i]
                c.add(f"{tt:.1f}", rec, cls, auth, staff, rec - cls)
    rep.results["aiosmtpd_seconds"] = base
    rep.notes.append(
        "The full curve (every 0.5 s) of every run is in the JSON report (runs[].values.curve)."
    )
