"""End to end: every message classified and its outbound mail accepted by the relay.

Throughput = messages / seconds from the first MAIL FROM until the last expected
outbound mail reached the capture relay. Two mixes, each sent by the asyncio
client (``--sessions`` parallel sessions, one message per connection):

- ``new``: new tickets, each from another account's primary address. Each one
  must cause a staff copy (``pending``) and an authorization mail.
- ``mix``: 50 % new tickets, 25 % follow-ups carrying the full tag with a valid
  code (``authorized``: a staff copy), 10 % replies to our authorization mail
  that lost the tag (filed by the signed reference in In-Reply-To;
  ``unauthorized`` + code_missing: staff copy and notice), 15 % unknown senders
  (``unauthorized``: staff copy, and a notice unless a cap against backscatter
  holds it back: each sender has its own domain, so the per-domain cap never
  applies, but a daemon may cap notices to strangers in all; those notices are
  counted, not required). The codes come from a setup phase that is
  not timed: tickets opened by mail, their links clicked (``POST /authorize``), the
  codes read from the acknowledgements the relay captured.

The baselines get the very same messages from the same client: the bare aiosmtpd
sink (the denominator of the ratio; target >= 0.4x) and smtp-sink.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

from bench import baselines, expect, mail, report
from bench import daemon as dmn
from bench.directory import primary
from bench.load import Outgoing, send_closed
from bench.scenarios import common
from bench.scenarios.common import RunRecord, Settings, Workspace

NAME = "e2e"
MIXES = ("new", "mix")


def params(s: Settings) -> dict[str, Any]:
    p = {
        "messages": 24 if s.short else 1000,
        "sessions": 5 if s.short else 20,
        "size": 2048,
        "repeat": s.repeats(3),
    }
    p.update({k: v for k, v in s.extra.items() if k in p and v is not None})
    return p


def shape(n: int) -> dict[str, int]:
    """How many of each kind in the follow-up mix of ``n`` messages."""
    counts = {"new": n * 50 // 100, "tagged": n * 25 // 100, "threadref": n * 10 // 100}
    counts["unknown"] = n - sum(counts.values())
    counts["setup"] = max(counts["threadref"], 1)  # each thread-ref reply its own ticket
    counts["clicked"] = max(1, min(counts["setup"], 20))
    return counts


def accounts_needed(n: int) -> int:
    c = shape(n)
    return n + c["setup"] + c["new"]


def mix_messages(
    run: str, n: int, size: int, tickets: list[common.Ticket], seed: int = 7
) -> tuple[list[Outgoing], dict[str, str]]:
    """The timed part of the mix (shuffled) and the kind of each message by key.
    ``tickets``: the setup's tickets, the first ``clicked`` of them with codes."""
    c = shape(n)
    clicked = [t for t in tickets if t.code]
    first_new = n + c["setup"]
    out: list[tuple[Outgoing, str]] = []
    for i in range(c["new"]):
        m = mail.build(
            index=i,
            run=run,
            kind="new",
            sender=primary(first_new + i),
            subject=mail.subject_for(first_new + i),
            size=size,
        )
        out.append((m, "new"))
    for i in range(c["tagged"]):
        t = clicked[i % len(clicked)]
        subject = f"Re: [{dmn.TAG_PREFIX}#{t.number}:{t.code}] {mail.subject_for(i)}"
        m = mail.build(
            index=i, run=run, kind="tagged", sender=t.recipient, subject=subject, size=size
        )
        out.append((m, "tagged"))
    for i in range(c["threadref"]):
        t = tickets[i % len(tickets)]
        m = mail.build(
            index=i,
            run=run,
            kind="threadref",
            sender=t.recipient,
            subject=f"Odp: {mail.subject_for(i)}",
            size=size,
            in_reply_to=t.auth_message_id,
        )
        out.append((m, "threadref"))
    for i in range(c["unknown"]):
        m = mail.build(
            index=i,
            run=run,
            kind="unknown",
            sender=f"klient{i}@nieznany{i}.test",
            subject=mail.subject_for(i),
            size=size,
        )
        out.append((m, "unknown"))
    random.Random(seed).shuffle(out)
    return [m for m, _ in out], {m.key: kind for m, kind in out}


def expect_mix(ledger: expect.Ledger, kinds: dict[str, str]) -> None:
    for key, kind in kinds.items():
        if kind == "new":
            ledger.staff_copy(key, "pending")
            ledger.reply(key, expect.AUTH)
        elif kind == "tagged":
            ledger.staff_copy(key, "authorized")
        else:  # a notice to a sender in no directory may be capped: optional
            ledger.staff_copy(key, "unauthorized")
            ledger.reply(key, expect.NOTICE, required=kind != "unknown")


def check_ticket(
    d: dmn.Daemon,
    record: RunRecord,
    ticket: common.Ticket,
    messages: list[Outgoing],
) -> None:
    """``iqmaild ticket show N --json`` of the first clicked ticket: authorized, the
    opening message and every follow-up with its code authorized, the reply that lost
    its tag filed under it as unauthorized."""
    c = shape(len(messages))  # mix_messages: tagged i -> clicked[i % clicked], threadref i -> i
    tagged = len(range(0, c["tagged"], c["clicked"]))
    threadref = 1 if c["threadref"] else 0
    try:
        shown = d.cli.ticket(ticket.number)
        decisions = [m.get("decision") for m in shown["messages"]]
        authorization = shown["authorization"]
    except (KeyError, TypeError, ValueError) as exc:
        record.problems.append(f"ticket show {ticket.number} --json: unexpected shape: {exc!r}")
        return
    record.checks["ticket_show"] = {
        "number": ticket.number,
        "authorization": authorization,
        "decisions": dict(Counter(decisions)),
    }
    want = {"authorized": 1 + tagged, "unauthorized": threadref}
    got = {k: decisions.count(k) for k in want}
    if authorization != "authorized" or got != want or len(decisions) != 1 + tagged + threadref:
        record.problems.append(
            f"ticket {ticket.number}: authorization {authorization!r}, decisions "
            f"{dict(Counter(decisions))}, expected authorized and {want}"
        )


def placeholder_tickets(n: int) -> list[common.Ticket]:
    """Stand-ins for the baselines, which have no daemon to open tickets."""
    c = shape(n)
    return [
        common.Ticket(
            1000 + i,
            primary(n + i),
            f"setup.{i}",
            f"iq.{1000 + i}.x@desk.test",
            "",
            code="0123456789abcdef0123" if i < c["clicked"] else None,
        )
        for i in range(c["setup"])
    ]


async def _measure_daemon(
    d: dmn.Daemon, relay: Any, record: RunRecord, mixname: str, p: dict[str, Any], timeout: float
) -> None:
    n, size = p["messages"], p["size"]
    run = f"e2e-{mixname}"
    ledger = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
    if mixname == "new":
        messages = common.new_tickets(run, 0, n, size)
        common.expect_new(ledger, messages)
        kinds = {m.key: "new" for m in messages}
    else:
        c = shape(n)
        setup_started = time.time()
        tickets = await common.open_tickets(d, relay, f"{run}-setup", n, c["setup"], size, timeout)
        acks = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
        await common.click(d, tickets[: c["clicked"]], acks)
        if not await common.wait_for(relay, acks, timeout):
            record.problems += ["setup: " + line for line in acks.problems()]
            return
        common.learn_codes(acks, tickets)
        record.values["setup_seconds"] = round(time.time() - setup_started, 1)
        messages, kinds = mix_messages(run, n, size, tickets)
        expect_mix(ledger, kinds)
    relay.read_new()  # the setup's mail is not part of the measurement
    cpu0 = d.cpu_seconds()
    sent = await send_closed(d.smtp_port, messages, sessions=p["sessions"])
    common.check_sent(sent, record)
    done = await common.wait_for(relay, ledger, timeout)
    cpu1 = d.cpu_seconds()
    first, last_250 = common.window(sent)
    record.problems += ledger.problems()
    last = ledger.last_arrival()
    if done and last is not None:
        seconds = last - first
        record.values.update(
            messages=n,
            seconds=seconds,
            rate=n / seconds,
            ingest_rate=n / (last_250 - first),
            cpu_ms_per_message=1000 * (cpu1 - cpu0) / n,
            outbound=sum(1 for w in ledger.wants if w.met),
        )
    if mixname == "mix" and done:
        await asyncio.to_thread(check_ticket, d, record, tickets[0], messages)
    record.checks["relay_counts"] = dict(ledger.counts)
    record.checks["unknown_sender_notices"] = list(ledger.optional_counts())
    record.checks["kinds"] = {k: list(kinds.values()).count(k) for k in set(kinds.values())}


def _measure_baseline(sink_cls: type, mixname: str, p: dict[str, Any], record: RunRecord) -> None:
    n, size = p["messages"], p["size"]
    if mixname == "new":
        messages = common.new_tickets(f"e2e-{mixname}", 0, n, size)
    else:
        messages, _ = mix_messages(f"e2e-{mixname}", n, size, placeholder_tickets(n))
    with sink_cls() as sink:
        cpu0 = sink.cpu_seconds()
        sent = asyncio.run(send_closed(sink.port, messages, sessions=p["sessions"]))
        cpu1 = sink.cpu_seconds()
    common.check_sent(sent, record)
    first, last = common.window(sent)
    record.values.update(
        messages=n,
        seconds=last - first,
        rate=n / (last - first),
        cpu_ms_per_message=1000 * (cpu1 - cpu0) / n,
    )


def run(s: Settings) -> report.Report:
    p = params(s)
    rep = report.Report(NAME, params={**p, "backends": ",".join(s.backends)})
    ws = Workspace(NAME, s.keep)
    timeout = max(120.0, p["messages"] / 5)
    records: dict[tuple[str, str, str], list[RunRecord]] = {}
    try:
        templates = {}
        for backend in s.backends:
            common.say(s, f"e2e: preparing {backend} ({accounts_needed(p['messages'])} accounts)")
            templates[backend] = ws.template(backend, accounts=accounts_needed(p["messages"]))
        mixes = tuple(s.extra.get("mixes") or MIXES)
        for r in range(1, p["repeat"] + 1):
            for mixname in mixes:
                for target in ("aiosmtpd", "smtp-sink"):
                    record = RunRecord(f"{mixname}-{target}-r{r}")
                    cls = baselines.AiosmtpdSink if target == "aiosmtpd" else baselines.SmtpSink
                    _measure_baseline(cls, mixname, p, record)
                    records.setdefault((mixname, "", target), []).append(record)
                    _progress(s, record)
                for backend in s.backends:
                    label = f"{mixname}-iqmaild-{backend}-r{r}"
                    with common.daemon_run(ws, templates[backend], label, s.options()) as (
                        d,
                        relay,
                        record,
                    ):
                        asyncio.run(_measure_daemon(d, relay, record, mixname, p, timeout))
                        if not record.problems:
                            common.check_daemon_state(d, record, _accepted(mixname, p))
                    records.setdefault((mixname, backend, "iqmaild"), []).append(record)
                    _progress(s, record)
        _tables(rep, records, s, mixes)
    finally:
        rep.runs = [r.as_dict() for rs in records.values() for r in rs]
        rep.problems += [
            f"{r.label}: {p}" for rs in records.values() for r in rs for p in r.problems
        ]
        ws.close(rep.ok)
        if not rep.ok:
            rep.notes.append(ws.kept_note())
    return rep


def _accepted(mixname: str, p: dict[str, Any]) -> int:
    n = p["messages"]
    return n if mixname == "new" else n + shape(n)["setup"]


def _progress(s: Settings, record: RunRecord) -> None:
    v = record.values
    status = "ok" if not record.problems else "FAILED: " + record.problems[0][:200]
    rate = f"{v['rate']:.1f}/s" if "rate" in v else "-"
    common.say(s, f"  {record.label:28s} {rate:>10s}  {status}")


def _tables(
    rep: report.Report,
    records: dict[tuple[str, str, str], list[RunRecord]],
    s: Settings,
    mixes: tuple[str, ...] = MIXES,
) -> None:
    for mixname in mixes:
        base = report.median(
            [
                r.values["rate"]
                for r in records.get((mixname, "", "aiosmtpd"), [])
                if "rate" in r.values
            ]
        )
        t = rep.table(
            f"end to end, mix '{mixname}' (median of {rep.params['repeat']})",
            [
                "target",
                "msgs",
                "seconds",
                "msgs/s",
                "vs aiosmtpd",
                "250s msgs/s",
                "CPU ms/msg",
                "range msgs/s",
            ],
        )
        rows = [
            ("aiosmtpd bare (same client)", ("", "aiosmtpd")),
            ("smtp-sink (same client)", ("", "smtp-sink")),
        ]
        rows += [(f"**iqmaild {b}**", (b, "iqmaild")) for b in s.backends]
        for label, (backend, target) in rows:
            good = [r for r in records.get((mixname, backend, target), []) if "rate" in r.values]
            rates = [r.values["rate"] for r in good]
            rate = report.median(rates)
            t.add(
                label,
                rep.params["messages"],
                report.fmt(report.median([r.values["seconds"] for r in good]), ".2f"),
                report.fmt(rate, ".1f"),
                report.fmt(report.ratio(rate, base), ".3f", "×"),
                report.fmt(
                    report.median([r.values.get("ingest_rate", r.values["rate"]) for r in good]),
                    ".0f",
                ),
                report.fmt(report.median([r.values["cpu_ms_per_message"] for r in good]), ".2f"),
                report.spread(rates, ".1f"),
            )
            if target == "iqmaild":
                rep.results[f"{mixname}_{backend}_rate"] = rate
                rep.results[f"{mixname}_{backend}_vs_aiosmtpd"] = report.ratio(rate, base)
        rep.results[f"{mixname}_aiosmtpd_rate"] = base
    rep.notes.append(
        "msgs/s: messages / (last expected outbound mail at the relay - first MAIL FROM); "
        "for the sinks, until the last 250. '250s msgs/s': until the last 250 only. "
        "CPU ms/msg: the server's process tree (daemon with its workers). Target: >= 0.4× "
        "the bare aiosmtpd sink."
    )
