"""Latency: 250 -> authorization mail at half the sustained maximum; click -> acknowledgement.

Per repetition, one daemon, three phases:

1. **maximum**: a closed-loop burst of new tickets (``--sessions`` 20); the
   sustained maximum = messages / time until the last authorization mail and
   staff copy reached the relay.
2. **250 -> authorization mail**: new tickets at half that rate, open loop (message
   i leaves at t0 + i/rate on its own connection, whatever the daemon does), for
   about 20 s. For each message: the relay's arrival time of its authorization
   mail minus the time the client read the 250. Also the client's MAIL FROM -> 250.
3. **click -> acknowledgement**: links of phase-2 tickets confirmed with
   ``POST /authorize/{token}``, 2 clicks per second (a desk at idle), and the time
   until the acknowledgement reached the relay. Also the POST's response time.

Baseline in the same run: the bare aiosmtpd sink fed the same open-loop load, its
MAIL FROM -> 250 latency (what client, loopback and the SMTP library add).
Targets: 250 -> authorization mail p99 <= 2 s; click -> acknowledgement p99 <= 1 s.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import baselines, expect, report
from bench import daemon as dmn
from bench.load import send_closed, send_paced
from bench.scenarios import common
from bench.scenarios.common import RunRecord, Settings, Workspace

NAME = "latency"


def params(s: Settings) -> dict[str, Any]:
    if s.short:
        p = {
            "max_messages": 20,
            "paced_seconds": 2.0,
            "paced_min": 10,
            "paced_max": 20,
            "clicks": 5,
            "click_rate": 10.0,
            "sessions": 5,
        }
    else:
        p = {
            "max_messages": 500,
            "paced_seconds": 20.0,
            "paced_min": 200,
            "paced_max": 4000,
            "clicks": 60,
            "click_rate": 2.0,
            "sessions": 20,
        }
    p.update(size=2048, repeat=s.repeats(3))
    if s.extra.get("messages"):
        p["max_messages"] = s.extra["messages"]
    if s.extra.get("sessions"):
        p["sessions"] = s.extra["sessions"]
    return p


def _tickets_of(ledger: expect.Ledger, messages: list[Any]) -> list[common.Ticket]:
    out = []
    for m in messages:
        auth = ledger.reply_wants[m.key].met
        if auth is None or auth.link_token is None:
            continue
        tag = auth.tag(dmn.TAG_PREFIX)
        if tag:
            out.append(common.Ticket(tag[0], m.mail_from, m.key, auth.message_id, auth.link_token))
    return out


async def _measure(
    d: dmn.Daemon, relay: Any, record: RunRecord, s: Settings, p: dict[str, Any]
) -> None:
    v = record.values
    timeout = 300.0
    # 1. the sustained maximum
    m = p["max_messages"]
    burst = common.new_tickets("lat-max", 0, m, p["size"])
    ledger = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
    common.expect_new(ledger, burst)
    sent = await send_closed(d.smtp_port, burst, sessions=p["sessions"])
    common.check_sent(sent, record)
    if not await common.wait_for(relay, ledger, timeout):
        record.problems += ["max phase: " + x for x in ledger.problems()]
        return
    first, _ = common.window(sent)
    v["max_rate"] = m / (ledger.last_arrival() - first)
    v["paced_rate"] = rate = v["max_rate"] / 2
    # 2. 250 -> authorization mail at half of it
    k = int(min(p["paced_max"], max(p["paced_min"], rate * p["paced_seconds"])))
    paced = common.new_tickets("lat-paced", m, k, p["size"])
    ledger = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
    common.expect_new(ledger, paced)
    relay.read_new()
    sent = await send_paced(d.smtp_port, paced, rate)
    common.check_sent(sent, record)
    if not await common.wait_for(relay, ledger, timeout):
        record.problems += ["paced phase: " + x for x in ledger.problems()]
        return
    done_at = {x.key: x.done for x in sent}
    v["paced_messages"] = k
    v["auth_latency"] = sorted(ledger.reply_wants[x.key].met.t - done_at[x.key] for x in paced)
    v["smtp_latency"] = sorted(x.done - x.started for x in sent)
    # 3. click -> acknowledgement
    tickets = _tickets_of(ledger, paced)[: p["clicks"]]
    acks = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
    clicks = await common.click(d, tickets, acks, rate=p["click_rate"])
    bad = [status for _, _, _, status in clicks if status != 200]
    if bad:
        record.problems.append(f"{len(bad)} clicks answered {bad[:3]}, not 200")
    if not await common.wait_for(relay, acks, timeout):
        record.problems += ["click phase: " + x for x in acks.problems()]
        return
    ack_at = {w.key: w.met_at for w in acks.wants if w.kind == expect.ACK}
    v["ack_latency"] = sorted(ack_at[t.recipient.lower()] - started for t, started, _, _ in clicks)
    v["post_seconds"] = sorted(seconds for _, _, seconds, _ in clicks)
    record.checks["accepted"] = m + k


def _baseline(p: dict[str, Any], rate: float, k: int, record: RunRecord) -> None:
    msgs = common.new_tickets("lat-paced", p["max_messages"], k, p["size"])
    with baselines.AiosmtpdSink() as sink:
        sent = asyncio.run(send_paced(sink.port, msgs, rate))
    common.check_sent(sent, record)
    record.values["smtp_latency"] = sorted(x.done - x.started for x in sent)


def run(s: Settings) -> report.Report:
    p = params(s)
    rep = report.Report(NAME, params={**p, "backends": ",".join(s.backends)})
    ws = Workspace(NAME, s.keep)
    records: dict[str, list[RunRecord]] = {}
    try:
        accounts = p["max_messages"] + p["paced_max"]
        common.say(s, f"latency: preparing ({accounts} accounts)")
        templates = {b: ws.template(b, accounts=accounts) for b in s.backends}
        for r in range(1, p["repeat"] + 1):
            for backend in s.backends:
                label = f"iqmaild-{backend}-r{r}"
                t0 = time.monotonic()
                with common.daemon_run(ws, templates[backend], label, s.options()) as (
                    d,
                    relay,
                    record,
                ):
                    asyncio.run(_measure(d, relay, record, s, p))
                    if not record.problems:
                        common.check_daemon_state(d, record, record.checks["accepted"])
                records.setdefault(backend, []).append(record)
                v = record.values
                common.say(
                    s,
                    f"  {label:22s} max {v.get('max_rate', 0):.1f}/s, paced "
                    f"{v.get('paced_rate', 0):.1f}/s, {time.monotonic() - t0:.0f}s  "
                    + ("ok" if not record.problems else "FAILED: " + record.problems[0][:200]),
                )
                if "paced_rate" in v:
                    base = RunRecord(f"aiosmtpd-{backend}-r{r}")
                    _baseline(p, v["paced_rate"], v["paced_messages"], base)
                    records.setdefault(f"aiosmtpd-{backend}", []).append(base)
        _tables(rep, records, s)
    finally:
        rep.runs = [r.as_dict() for rs in records.values() for r in rs]
        rep.problems += [
            f"{r.label}: {x}" for rs in records.values() for r in rs for x in r.problems
        ]
        ws.close(rep.ok)
        if not rep.ok:
            rep.notes.append(ws.kept_note())
    return rep


def _row(t: report.Table, name: str, runs: list[RunRecord], key: str, target: str) -> dict:
    series = [r.values[key] for r in runs if r.values.get(key)]
    stats = {q: report.median([report.percentile(x, q) for x in series]) for q in (50, 90, 99)}
    worst = max((x[-1] for x in series), default=None)
    n = report.median([len(x) for x in series])
    t.add(
        name,
        report.fmt(n, ".0f"),
        *(report.fmt(stats[q], ".3f", " s") for q in (50, 90, 99)),
        report.fmt(worst, ".3f", " s"),
        target,
    )
    return stats


def _tables(rep: report.Report, records: dict[str, list[RunRecord]], s: Settings) -> None:
    for backend in s.backends:
        runs = [r for r in records.get(backend, []) if "auth_latency" in r.values]
        max_rate = report.median([r.values["max_rate"] for r in runs])
        paced = report.median([r.values["paced_rate"] for r in runs])
        t = rep.table(
            f"latency, iqmaild {backend}: sustained maximum {report.fmt(max_rate, '.1f')} msgs/s, "
            f"paced at {report.fmt(paced, '.1f')} msgs/s (medians over {len(runs)} runs)",
            ["measure", "n", "p50", "p90", "p99", "max", "target"],
        )
        auth = _row(t, "**250 → authorization mail at relay**", runs, "auth_latency", "p99 ≤ 2 s")
        _row(t, "SMTP MAIL FROM → 250 (iqmaild)", runs, "smtp_latency", "")
        _row(
            t,
            "SMTP MAIL FROM → 250 (aiosmtpd bare, same load)",
            records.get(f"aiosmtpd-{backend}", []),
            "smtp_latency",
            "baseline",
        )
        ack = _row(t, "**click → acknowledgement at relay**", runs, "ack_latency", "p99 ≤ 1 s")
        _row(t, "POST /authorize response", runs, "post_seconds", "")
        rep.results.update(
            {
                f"{backend}_max_rate": max_rate,
                f"{backend}_paced_rate": paced,
                f"{backend}_auth_p50": auth[50],
                f"{backend}_auth_p99": auth[99],
                f"{backend}_ack_p50": ack[50],
                f"{backend}_ack_p99": ack[99],
            }
        )
