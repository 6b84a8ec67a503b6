"""What the scenarios share: settings, the work directory, one daemon run, checks."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import daemon as dmn
from bench import expect, mail, proc
from bench.backends import Backend
from bench.load import Outgoing, Sent
from bench.relay import Relay


@dataclass
class Settings:
    """Command-line options every scenario understands."""

    short: bool = False
    repeat: int | None = None  # None: the scenario's default (1 with --short)
    backends: tuple[str, ...] = ("sqlite",)
    keep: bool = False
    log_level: str = "info"
    idle_close: float | None = None  # outbound.idle_close_seconds; None: daemon default
    profile_dir: Path | None = None
    verbose: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def repeats(self, default: int) -> int:
        if self.repeat is not None:
            return self.repeat
        return 1 if self.short else default

    def options(self, **kw: Any) -> dmn.Options:
        overrides: dict[str, dict[str, Any]] = {}
        if self.idle_close is not None:
            overrides["outbound"] = {"idle_close_seconds": self.idle_close}
        return dmn.Options(log_level=self.log_level, overrides=overrides, **kw)


class Workspace:
    """A temporary directory for one scenario; kept on failure or with --keep."""

    def __init__(self, scenario: str, keep: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"iqbench-{scenario}-"))
        self.keep = keep
        self.templates: list[Backend] = []
        self.kept_databases: list[str] = []
        self._n = 0

    def run_dir(self, label: str) -> Path:
        self._n += 1
        path = self.root / f"{self._n:03d}-{label}"
        path.mkdir()
        return path

    def template(self, backend: str, **kw: Any) -> Backend:
        db = dmn.prepare(self.root / f"template-{backend}-{len(self.templates)}", backend, **kw)
        self.templates.append(db)
        return db

    def release(self, db: Backend, keep: bool) -> None:
        """Drop a run's PostgreSQL copy, unless it is kept to look at (failure, --keep)."""
        if db.name != "postgres":
            return
        if keep or self.keep:
            self.kept_databases.append(getattr(db, "database", "?"))
            return
        with contextlib.suppress(Exception):
            db.drop()

    def kept_note(self) -> str:
        note = f"work directory kept: {self.root}"
        if self.kept_databases:
            note += "; PostgreSQL databases kept: " + ", ".join(self.kept_databases)
        return note

    def close(self, ok: bool) -> None:
        for db in self.templates:
            with contextlib.suppress(Exception):
                if db.name == "postgres":
                    db.drop()
        if ok and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)


_STARTED = time.monotonic()


def say(settings: Settings, text: str) -> None:
    """Progress on stderr, with the seconds since the benchmark started."""
    if settings.verbose:
        import sys

        print(f"[{time.monotonic() - _STARTED:6.1f}s] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def daemon_run(
    ws: Workspace, template: Backend, label: str, options: dmn.Options
) -> Iterator[tuple[dmn.Daemon, Relay, RunRecord]]:
    """A fresh copy of the template, a capture relay, ``iqmaild serve``; on the way out:
    the daemon stopped (exit 0, no error lines) and the copy dropped (PostgreSQL)."""
    run_dir = ws.run_dir(label)
    db = template.clone(run_dir)
    record = RunRecord(label=label, workdir=str(run_dir))
    try:
        with Relay(run_dir) as relay:
            d = dmn.Daemon(run_dir, db, relay.port, options)
            try:
                d.start()
                yield d, relay, record
            except Exception as exc:  # a broken run is a FAILED run, not a lost report
                import traceback

                where = traceback.extract_tb(exc.__traceback__)[-1]
                record.problems.append(
                    f"{type(exc).__name__}: {exc} (at {Path(where.filename).name}:{where.lineno})"
                )
            finally:
                exit_info = d.stop()
                record.checks["daemon_exit"] = exit_info
                if exit_info.get("status") != 0:
                    record.problems.append(
                        f"iqmaild serve exited {exit_info.get('status')} on SIGTERM "
                        f"(log {d.log_path})"
                    )
                if exit_info.get("error_lines"):
                    record.problems.append(
                        f"{exit_info['error_lines']} error lines in the daemon log, first: "
                        f"{str(exit_info['first_errors'][:1])[:300]}"
                    )
                record.checks["relay_cpu_seconds"] = round(relay.cpu_seconds(), 2)
    finally:
        ws.release(db, keep=bool(record.problems))


@dataclass
class RunRecord:
    label: str
    workdir: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "workdir": self.workdir,
            "values": self.values,
            "checks": self.checks,
            "problems": self.problems,
        }


def check_sent(sent: list[Sent], record: RunRecord) -> None:
    failed = [s for s in sent if not s.ok]
    if failed:
        record.problems.append(
            f"{len(failed)} of {len(sent)} messages not accepted, first: "
            f"{failed[0].code} {failed[0].reply[:200]}"
        )


def window(sent: list[Sent]) -> tuple[float, float]:
    """(first MAIL FROM, last 250) of a load."""
    return min(s.started for s in sent), max(s.done for s in sent)


def check_daemon_state(d: dmn.Daemon, record: RunRecord, accepted: int) -> list[dict[str, Any]]:
    """After the run, through the CLI: every accepted message stored and processed, no
    dead letter, every outbox row sent."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two CLI processes side by side
        stored = pool.submit(dmn.check_stored, d.cli, accepted)
        outbox_rows = pool.submit(d.cli.outbox)
        rows, problems = stored.result()
        outbox = outbox_rows.result()
    record.problems += problems
    states: dict[str, int] = {}
    for r in rows:
        states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
    record.checks["message_states"] = states
    if states.get("received"):
        record.problems.append(f"{states['received']} messages never processed")
    ostates: dict[str, int] = {}
    for r in outbox:
        ostates[r.get("state", "?")] = ostates.get(r.get("state", "?"), 0) + 1
    record.checks["outbox_states"] = ostates
    if ostates.get("failed"):
        record.problems.append(f"{ostates['failed']} outbox rows failed")
    if ostates.get("queued") or ostates.get("sending"):
        record.problems.append(f"outbox rows not sent: {ostates}")
    return rows


async def wait_for(relay: Relay, ledger: expect.Ledger, timeout: float) -> bool:
    """Until every required mail arrived; then, if optional mail is still open, until
    the relay has been quiet for 2 s (that only bounds how long we look, not the time
    measured, which is the last arrival)."""
    done = await relay.wait_until(ledger.done, timeout, ledger.feed)
    if done and ledger.optional_open():
        await relay.settle(ledger.feed)
    return done


# ---------------------------------------------------------------------------
# traffic: new tickets, and the follow-up mix
# ---------------------------------------------------------------------------


def new_tickets(
    run: str, first_account: int, count: int, size: int, first_index: int = 0
) -> list[Outgoing]:
    """``count`` new tickets, each from another account's primary address."""
    from bench.directory import primary

    return [
        mail.build(
            index=first_index + n,
            run=run,
            kind="new",
            sender=primary(first_account + n),
            subject=mail.subject_for(first_account + n),
            size=size,
        )
        for n in range(count)
    ]


def expect_new(ledger: expect.Ledger, messages: list[Outgoing]) -> None:
    for m in messages:
        ledger.staff_copy(m.key, "pending")
        ledger.reply(m.key, expect.AUTH)


@dataclass
class Ticket:
    number: int
    recipient: str
    key: str  # the customer's Message-ID that opened it
    auth_message_id: str  # our authorization mail's Message-ID (a signed reference)
    token: str
    code: str | None = None  # from the acknowledgement, once the link was clicked


async def open_tickets(
    d: dmn.Daemon, relay: Relay, run: str, first_account: int, count: int, size: int, timeout: float
) -> list[Ticket]:
    """New tickets, waited for until each authorization mail is at the relay."""
    from bench.load import send_closed

    messages = new_tickets(run, first_account, count, size)
    ledger = expect.Ledger(dmn.STAFF, dmn.TAG_PREFIX)
    expect_new(ledger, messages)
    sent = await send_closed(d.smtp_port, messages, sessions=min(20, count))
    if any(not s.ok for s in sent):
        raise proc.BenchError(f"setup: a message was refused: {[s.reply for s in sent][:1]}")
    if not await wait_for(relay, ledger, timeout):
        raise proc.BenchError("setup: " + "; ".join(ledger.problems()))
    tickets = []
    for m in messages:
        auth = ledger.reply_wants[m.key].met
        assert auth is not None
        tag = auth.tag(dmn.TAG_PREFIX)
        if tag is None or auth.link_token is None:
            raise proc.BenchError(f"setup: authorization mail without tag or link: {auth.subject}")
        tickets.append(Ticket(tag[0], m.mail_from, m.key, auth.message_id, auth.link_token))
    return tickets


async def click(
    d: dmn.Daemon, tickets: list[Ticket], ledger: expect.Ledger, rate: float | None = None
) -> list[tuple[Ticket, float, float, int]]:
    """POST each ticket's link (paced at ``rate`` per second, or one after the other);
    expects the acknowledgement and the authorized staff copy. Returns (ticket, time
    the POST left, seconds until its response, HTTP status)."""
    out = []
    t0 = time.monotonic()
    for i, ticket in enumerate(tickets):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        started = time.time()
        ledger.acknowledgement(ticket.recipient, ticket.number, after=started)
        ledger.staff_copy(ticket.key, "authorized")
        status = await asyncio.to_thread(d.click, ticket.token)
        out.append((ticket, started, time.time() - started, status))
    return out


def learn_codes(ledger: expect.Ledger, tickets: list[Ticket]) -> None:
    by_number = {t.number: t for t in tickets}
    for want in ledger.wants:
        if want.kind == expect.ACK and want.met is not None:
            tag = want.met.tag(dmn.TAG_PREFIX)
            if tag and tag[0] in by_number:
                by_number[tag[0]].code = tag[1]


# ---------------------------------------------------------------------------
# profiling (optional)
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def maybe_profile(s: Settings, d: dmn.Daemon, label: str, record: RunRecord) -> Iterator[None]:
    """py-spy on the daemon while the block runs, if --profile was given."""
    if s.profile_dir is None:
        yield
        return
    from bench import profile

    with profile.Profiler(d.pid, s.profile_dir, label) as p:
        yield
    record.checks["profile"] = {"file": str(p.path), **profile.summarize(p.path)}


def profile_tables(rep: Any, records: list[RunRecord]) -> None:
    for record in records:
        prof = record.checks.get("profile")
        if not prof or not prof.get("samples"):
            continue
        total = prof["samples"]
        for key, title in (
            ("by_library", "library (innermost known frame)"),
            ("by_module", "iqmaild module (innermost on the stack)"),
        ):
            t = rep.table(
                f"profile of {record.label}: CPU samples by {title}",
                ["where", "samples", "share"],
                note=f"{total} samples; raw stacks: {prof['file']}",
            )
            for name, n in list(prof[key].items())[:15]:
                t.add(name, n, f"{100 * n / total:.1f} %")
