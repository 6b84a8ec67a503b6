"""The one place that wires the stages around the core and runs them.

One instance is a daemon process (SMTP/LMTP intake, the group commit, HTTP)
and, with ``processing.workers = 1``, a worker process of its own
(classification, apply, delivery), so intake and processing use both cores.
The daemon supervises the worker (restarts it when it dies) and wakes it after
every commit; the worker also polls for due rows, so mail queued by the CLI or
another instance leaves within a poll interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from iqmaild import logs
from iqmaild.apply.effects import Applier, Settings
from iqmaild.apply.links import Links
from iqmaild.apply.tickets import tag_for
from iqmaild.classify.batch import Classifier
from iqmaild.clock import Clock, SystemClock
from iqmaild.config import Config, split_host_port
from iqmaild.core.addresses import normalize
from iqmaild.core.facts import PolicyConfig
from iqmaild.core.ratelimit import Limits
from iqmaild.core.tag import TagFormat
from iqmaild.deliver.compose import Composer
from iqmaild.deliver.outbox import OutboxWorker
from iqmaild.imap.staff import StaffFolder
from iqmaild.ingest.imap import ImapIntake
from iqmaild.ingest.panel import PanelRequest, panel_message
from iqmaild.ingest.smtp import DeskHandler, start_listener
from iqmaild.lifecycle.retention import Retention
from iqmaild.metrics import KINDS, Metrics
from iqmaild.parse.message import ParseContext
from iqmaild.persist.store import GroupCommitter
from iqmaild.rendering import Renderer
from iqmaild.storage import schema
from iqmaild.storage.db import Database, InstanceLock
from iqmaild.storage.models import Message, OutboxItem, Ticket
from iqmaild.systemd import child_environment
from iqmaild.web.app import HttpServer, WebApp, start_http


def instance_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Parts:
    """What the stages are built from; used here and by the CLI, never handed on."""

    config: Config
    clock: Clock
    log: Any
    metrics: Metrics
    db: Database
    renderer: Renderer
    tags: TagFormat
    composer: Composer
    applier: Applier
    instance: str

    def classifier(self, on_processed: Callable[[], None] | None = None) -> Classifier:
        config = self.config
        return Classifier(
            self.db,
            self.clock,
            self.applier,
            parse_context(config, self.tags, self.composer.domain),
            policy_config(config),
            log=self.log,
            metrics=self.metrics,
            instance=self.instance,
            batch_size=config.processing.batch_size,
            lease_seconds=config.processing.lease_seconds,
            max_attempts=config.processing.max_attempts,
            retry_seconds=config.processing.retry_seconds,
            on_processed=on_processed,
        )

    def outbox(self) -> OutboxWorker:
        return OutboxWorker(
            self.db,
            self.config,
            self.clock,
            self.log,
            self.metrics,
            instance=self.instance,
            composer=self.composer,
            connections=self.config.outbound.connections,
            poll_seconds=self.config.processing.poll_seconds,
            staff_folder=staff_folder(self.config),
        )

    def links(self) -> Links:
        return Links(self.db, self.clock, self.applier, self.log, self.metrics)

    def retention(self) -> Retention:
        return Retention(
            self.db,
            self.clock,
            self.config.retention.periods,
            batch_size=self.config.retention.batch_size,
            log=self.log,
        )


def staff_folder(config: Config) -> StaffFolder | None:
    """IMAP mode with imap.staff_folder: staff copies are APPENDed, not relayed."""
    if config.imap.enabled and config.imap.staff_folder:
        return StaffFolder(config.imap)
    return None


def rate_limits(config: Any) -> Limits:
    """The pure core's limits from ``outbound.rate_limit`` (at start and on reload)."""
    return Limits(
        per_recipient_10min=config.per_recipient_10min,
        per_recipient_day=config.per_recipient_day,
        per_ticket_day=config.per_ticket_day,
        unknown_sender_domain_hour=config.unknown_sender_domain_hour,
        unknown_sender_hour=config.unknown_sender_hour,
    )


def build(config: Config, log: Any | None = None, clock: Clock | None = None) -> Parts:
    log = log or logs.get("iqmaild")
    clock = clock or SystemClock()
    metrics = Metrics()
    db = Database(config.database.url, config.database.pool_size)
    override = Path(config.templates.override_dir) if config.templates.override_dir else None
    renderer = Renderer(override_dir=override)
    tags = TagFormat(config.tickets.tag_prefix)
    composer = Composer(config, renderer, tags, clock)
    settings = Settings(
        number_start=config.tickets.number_start,
        link_ttl_hours=config.tickets.link_ttl_hours,
        public_url=config.http.public_url,
        default_lang=config.notices.default_lang,
        staff_address=config.outbound.staff_address,
        return_path=config.return_path_base,
        delimiter=config.smtp.recipient_delimiter,
        desk_addresses=frozenset(config.smtp.desk_addresses),
        bounce_suppress_hours=config.outbound.bounce_suppress_hours,
        limits=rate_limits(config.outbound.rate_limit),
        sequence_numbers=not db.is_sqlite,
    )
    applier = Applier(settings, composer, tags, config.keys, clock, log, metrics)
    return Parts(config, clock, log, metrics, db, renderer, tags, composer, applier, instance_id())


def parse_context(config: Config, tags: TagFormat, domain: str) -> ParseContext:
    split = (p.partition(":") for p in config.security.admin_header_patterns)
    return ParseContext(
        tags=tags,
        key=config.keys,
        msgid_domain=domain,
        trusted_authserv_ids=frozenset(a.lower() for a in config.security.trusted_authserv_ids),
        wanted_headers=frozenset(name.strip().lower() for name, _, _ in split),
        return_path=config.return_path_base,
        delimiter=config.smtp.recipient_delimiter,
        link_prefix=f"{config.http.public_url}/authorize/",
    )


def policy_config(config: Config) -> PolicyConfig:
    split = (p.partition(":") for p in config.security.admin_header_patterns)
    return PolicyConfig(
        desk_addresses=frozenset(config.smtp.desk_addresses),
        admin_header_patterns=tuple(
            (name.strip().lower(), pattern.strip()) for name, _, pattern in split
        ),
        admin_senders=frozenset(
            n for a in config.security.admin_senders if (n := normalize(a)) is not None
        ),
        dmarc_enforce=config.security.dmarc_enforce,
        notify_unknown_senders=config.notices.notify_unknown_senders,
        max_hops=config.processing.max_hops,
        delimiter=config.smtp.recipient_delimiter,
        return_path=config.return_path_base,
    )


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else key))
    return out


# Keys a reload applies to the running process; every other change needs a restart.
LIVE_KEYS = (
    "logging.level",
    "templates.",
    "outbound.rate_limit.",
    "http.authorize_attempts",
    "http.panel_failures",
)


def changed_keys(old: Config, new: Config) -> list[str]:
    before, after = _flat(old.model_dump(by_alias=True)), _flat(new.model_dump(by_alias=True))
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def reload_parts(parts: Parts, new: Config) -> list[str]:
    """Apply what can change live (SIGHUP): templates (always re-read, also an unchanged
    override directory's edited files), rate limits, the log level.

    The directory has no cache to drop: it is read from the database per message,
    so an import is seen by the next message without a reload. Returns what was
    reloaded; the caller logs the changed keys that still need a restart.
    """
    logs.set_level(new.logging.level)
    override = Path(new.templates.override_dir) if new.templates.override_dir else None
    parts.renderer = Renderer(override_dir=override)
    parts.composer.renderer = parts.renderer
    parts.applier.settings = dataclasses.replace(
        parts.applier.settings, limits=rate_limits(new.outbound.rate_limit)
    )
    return ["templates", "outbound.rate_limit", f"logging.level={new.logging.level}"]


class Daemon:
    """Owns every task, server and the worker of one instance; ``start``/``stop`` in one loop.

    ``workers=None`` follows ``processing.workers``; tests pass 0 to keep
    everything in their own event loop (``drain()`` then runs the stages).
    """

    def __init__(
        self,
        config: Config,
        log: Any | None = None,
        clock: Clock | None = None,
        *,
        workers: int | None = None,
    ) -> None:
        self.config = config
        self.parts = build(config, log, clock)
        self.log = self.parts.log
        self.clock = self.parts.clock
        self.db = self.parts.db
        self.metrics = self.parts.metrics
        self.workers = config.processing.workers if workers is None else workers
        self.outbox = self.parts.outbox()
        self.classifier = self.parts.classifier(on_processed=self.outbox.notify)
        self.retention = self.parts.retention()
        self.committer = GroupCommitter(
            self.db, self.clock, config.smtp.group_commit_max, self._committed, self.metrics
        )
        self.worker: Supervisor | None = None
        self.loaded = config  # the config of the last (re)load: what a reload compares to
        self.web = WebApp(
            config,
            self.db,
            self.parts.renderer,
            self.parts.links(),
            self._panel_ticket,
            log=self.log,
            metrics=self.metrics,
            clock=self.clock,
            problems=self.problems,
            queued=self._queued,
            health=self.health,
            gauges=self.gauges,
        )
        self._probe: tuple[float, str | None] = (float("-inf"), None)
        self.lock = InstanceLock(config.database.url)
        self.tasks: list[asyncio.Task[Any]] = []
        self.smtp_server: asyncio.AbstractServer | None = None
        self.smtp_limits: Any = None
        self.http_runner: HttpServer | None = None
        self.admin_runner: HttpServer | None = None
        self.smtp_port = 0
        self.http_port = 0
        self.imap: ImapIntake | None = None
        self.admin_port = 0  # http.admin_listen's port (0: the admin paths are on http_port)

    def _committed(self) -> None:
        """Intake committed: classification has work."""
        if self.worker is not None:
            self.worker.wake()
        else:
            self.classifier.notify()

    def _queued(self) -> None:
        """Something here queued mail (a click, the panel): the sender has work."""
        if self.worker is not None:
            self.worker.wake()
        else:
            self.outbox.notify()

    async def _panel_ticket(self, request: PanelRequest) -> tuple[int | None, dict[str, Any]]:
        """Store and classify at once: the panel answers with the ticket number."""
        item = panel_message(
            request, self.config.smtp.desk_addresses[0], self.parts.composer.domain, self.clock
        )
        stored = await self.committer.store(item)
        await self.classifier.process_one(stored.id)  # a worker may have taken it first
        self._queued()
        for _ in range(50):
            async with self.db.read() as session:
                number = await session.scalar(
                    select(Message.ticket_id).where(
                        Message.id == stored.id, Message.state == "processed"
                    )
                )
                ticket = await session.get(Ticket, number) if number else None
            if ticket is not None:
                tag = tag_for(self.parts.tags, self.config.keys, ticket, True)
                return stored.id, {
                    "number": ticket.number,
                    "tag": tag,
                    "authorization": ticket.authorization,
                }
            await asyncio.sleep(0.1)
        return stored.id, {}

    async def start(self, *, background: bool = True) -> None:
        # Before anything touches the database: a second daemon on the same SQLite
        # file must not take back the first one's claims and then fail to bind.
        self.lock.acquire()
        asyncio.get_running_loop().set_exception_handler(logs.LoopErrors(self.log))
        await schema.ensure_current(self.db)
        if self.db.is_sqlite:
            # Nobody else can run on this file (the instance lock says so), so every
            # claim left in it is a dead instance's.
            requeued = await self.outbox.recover(all_claims=True)
            await self.classifier.release_claims(everyone=True)
        else:
            requeued = await self.outbox.recover()
        handler = DeskHandler(self.config, self.committer, self.log, self.metrics)
        self.smtp_server, self.smtp_port, self.smtp_limits = await start_listener(
            self.config, handler, self.log
        )
        host, port = split_host_port(self.config.http.listen)
        self.http_runner, self.http_port = await start_http(
            self.web, host, port, self.config.http.max_connections
        )
        if self.web.admin_app is not None:
            host, port = split_host_port(self.config.http.admin_listen)
            self.admin_runner, self.admin_port = await start_http(
                self.web, host, port, self.config.http.max_connections, app=self.web.admin_app
            )
        self._spawn(self.committer.run(), "group-commit")
        if self.config.imap.enabled:  # beside SMTP intake, into the same committer
            self.imap = ImapIntake(
                self.config, self.committer, self.db, self.clock, self.log, self.metrics
            )
            self._spawn(self.imap.run(), "imap")
        if background and self.workers:
            self.worker = Supervisor(self.config, self.log, self.metrics)
            await self.worker.start()
            self._spawn(self.worker.run(), "worker")
        elif background:
            self._spawn(self._classify_loop(), "classify")
            self._spawn(self.outbox.run(), "outbox")
        if background and self.config.retention.daily:
            self._spawn(self.retention.daily(), "retention")
        self.log.info(
            "daemon.started",
            smtp_port=self.smtp_port,
            http_port=self.http_port,
            admin_port=self.admin_port or None,
            protocol=self.config.smtp.protocol,
            requeued_outbox=requeued,
            worker=bool(self.worker),
        )

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._task_ended)
        self.tasks.append(task)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return  # it finished its work (the worker's supervisor, once stopped)
        self.log.critical(
            "task.died", task=task.get_name(), error=f"{type(error).__name__}: {error}"[:300]
        )

    async def problems(self) -> list[str]:
        """What /healthz reports besides the database: stopped tasks, intake that cannot
        commit, stages that keep failing.

        Reads alone prove little (a full disk still reads): health says whether
        intake commits, from intake's own last attempt or a probe through its path.
        """
        out = [f"task {t.get_name()} stopped" for t in self.tasks if t.done()]
        now = self.clock.monotonic()
        committer = self.committer
        idle = committer.last_success is None or now - committer.last_success > 30
        if committer.failed_since is not None or idle:
            when, error = self._probe
            # While intake fails, probe every second: health turns back to ok once
            # the database takes writes again, with or without new mail.
            if now - when > (1 if committer.failed_since is not None else 5):
                error = await committer.probe()  # clears failed_since once trusted
                self._probe = (now, error)
            if committer.failed_since is not None:
                out.append(f"intake cannot commit (for {now - committer.failed_since:.0f} s)")
            elif error:
                out.append(f"database does not accept writes: {error}")
        imap = self.imap
        if imap is not None and imap.failing_since is not None and now - imap.failing_since > 60:
            out.append(f"IMAP intake not connected for {now - imap.failing_since:.0f} s")
        if self.worker is not None and not self.worker.alive:
            out.append("worker process is not running")
        stages = self._stages()
        for stage, failing in (
            ("classification", stages.get("classifier_failing_since")),
            ("outbox", stages.get("outbox_failing_since")),
        ):
            if failing is not None and now - failing > 10:
                out.append(f"{stage} has been failing for {now - failing:.0f} s")
        return out

    async def reload(self, new: Config) -> dict[str, list[str]]:
        """SIGHUP: apply what can change live here and in the worker; log what it did.

        ``needs_restart`` lists the changed keys this process keeps at their old
        value (listeners, database, the secret key...) until the next restart.
        """
        changed = changed_keys(self.loaded, new)
        reloaded = reload_parts(self.parts, new)
        self.web.renderer = self.parts.renderer
        self.web.limiter.limit = new.http.authorize_attempts_per_minute
        self.web.panel_failures.limit = new.http.panel_failures_per_minute
        reloaded.append("http rate limits")
        if self.worker is not None:
            self.worker.reload(new)
            reloaded.append("worker")
        self.loaded = new
        needs_restart = [k for k in changed if not k.startswith(LIVE_KEYS)]
        report = {"reloaded": reloaded, "changed": changed, "needs_restart": needs_restart}
        self.log.info("daemon.reloaded", **report)
        return report

    async def backlog(self) -> dict[str, Any]:
        """What waits: received mail not yet classified, outbox rows not yet sent (by
        kind), with the age of the oldest of each; for /healthz, /metrics, STATUS=."""
        now = self.clock.now()
        async with self.db.read() as session:
            received = (
                await session.execute(
                    select(func.count(), func.min(Message.received_at)).where(
                        Message.state == "received"
                    )
                )
            ).one()
            rows = await session.execute(
                select(OutboxItem.kind, func.count(), func.min(OutboxItem.created_at))
                .where(OutboxItem.state.in_(("queued", "sending")))
                .group_by(OutboxItem.kind)
            )
            outbox = {kind: (count, oldest) for kind, count, oldest in rows}

        def age(when: Any) -> float:
            return max((now - when).total_seconds(), 0.0) if when is not None else 0.0

        return {
            "classifier": {"count": int(received[0]), "oldest_seconds": age(received[1])},
            "outbox": {
                kind: {"count": int(count), "oldest_seconds": age(oldest)}
                for kind, (count, oldest) in outbox.items()
            },
        }

    def _stages(self) -> dict[str, Any]:
        """The processing side's state: the worker's last report, or our own stages."""
        if self.worker is not None:
            return self.worker.status
        failure = self.outbox.last_relay_failure
        return {
            "relay_success": self.outbox.last_relay_success,
            "relay_failure": failure[0] if failure else None,
            "relay_error": failure[1] if failure else None,
            "relay_failing_since": self.outbox.relay_failing_since,
            "classifier_failing_since": self.classifier.failing_since,
            "outbox_failing_since": self.outbox.failing_since,
        }

    async def health(self) -> tuple[list[str], dict[str, Any]]:
        """/healthz: every check with its figures and threshold; any problem is a 503."""
        limits = self.config.health
        now = self.clock.monotonic()
        problems = await self.problems()
        db_ok = await self.db.ping()
        if not db_ok:
            problems.insert(0, "database unavailable")
        intake = [p for p in problems if "intake" in p or "database" in p]
        checks: dict[str, Any] = {"database": {"ok": db_ok and not intake, "problems": intake}}

        servers = {"smtp": self.smtp_server, "http": self.http_runner, "admin": self.admin_runner}
        listening = {}
        for name, server in servers.items():
            if server is None and name == "admin":
                continue
            inner = getattr(server, "server", server)
            listening[name] = bool(inner is not None and inner.is_serving())
        checks["listeners"] = {"ok": all(listening.values()), **listening}
        problems += [f"{name} listener is not serving" for name, up in listening.items() if not up]

        stages = self._stages()

        def ago(when: float | None) -> float | None:
            return None if when is None else round(max(now - when, 0.0), 3)

        failing = stages.get("relay_failing_since")
        relay_ok = failing is None or now - failing <= limits.relay_failing_max_seconds
        checks["relay"] = {
            "ok": relay_ok,
            "last_success_seconds_ago": ago(stages.get("relay_success")),
            "last_failure_seconds_ago": ago(stages.get("relay_failure")),
            "last_error": stages.get("relay_error"),
            "failing_for_seconds": ago(failing),
            "max_failing_seconds": limits.relay_failing_max_seconds,
        }
        if not relay_ok:
            problems.append(f"relay failing for {now - failing:.0f} s: {stages.get('relay_error')}")
        try:
            backlog = await self.backlog()
        except Exception as exc:
            problems.append(f"backlog unknown: {type(exc).__name__}")
            return problems, checks
        outbox = backlog["outbox"]
        depth = sum(v["count"] for v in outbox.values())
        oldest = max((v["oldest_seconds"] for v in outbox.values()), default=0.0)
        checks["outbox"] = {
            "ok": depth <= limits.outbox_backlog_max and oldest <= limits.outbox_oldest_max_seconds,
            "backlog": depth,
            "oldest_seconds": round(oldest, 3),
            "by_kind": outbox,
            "max_backlog": limits.outbox_backlog_max,
            "max_oldest_seconds": limits.outbox_oldest_max_seconds,
        }
        if depth > limits.outbox_backlog_max:
            problems.append(f"outbox backlog {depth} > {limits.outbox_backlog_max}")
        if oldest > limits.outbox_oldest_max_seconds:
            problems.append(f"oldest outbox mail waits {oldest:.0f} s")
        waiting = backlog["classifier"]
        checks["classifier"] = {
            "ok": waiting["count"] <= limits.classifier_backlog_max
            and waiting["oldest_seconds"] <= limits.classifier_oldest_max_seconds,
            "backlog": waiting["count"],
            "oldest_seconds": round(waiting["oldest_seconds"], 3),
            "max_backlog": limits.classifier_backlog_max,
            "max_oldest_seconds": limits.classifier_oldest_max_seconds,
        }
        if waiting["count"] > limits.classifier_backlog_max:
            problems.append(
                f"classifier backlog {waiting['count']} > {limits.classifier_backlog_max}"
            )
        if waiting["oldest_seconds"] > limits.classifier_oldest_max_seconds:
            problems.append(f"oldest unclassified message waits {waiting['oldest_seconds']:.0f} s")
        if self.worker is not None:
            checks["worker"] = {"ok": self.worker.alive, "restarts": self.worker.restarts}
        return problems, checks

    async def gauges(self) -> None:
        """/metrics: queue depths and ages by kind, relay times, the worker (at scrape)."""
        now = self.clock.monotonic()
        stages = self._stages()
        for key, name in (
            ("relay_success", "relay_last_success_seconds"),
            ("relay_failure", "relay_last_failure_seconds"),
        ):
            when = stages.get(key)
            self.metrics.set(name, -1 if when is None else max(now - when, 0.0))
        self.metrics.set("worker_up", 1 if self.worker is None or self.worker.alive else 0)
        backlog = await self.backlog()
        for kind in KINDS:
            self.metrics.set("outbox_depth", 0, kind=kind)
            self.metrics.set("outbox_oldest_seconds", 0, kind=kind)
        for kind, values in backlog["outbox"].items():
            self.metrics.set("outbox_depth", values["count"], kind=kind)
            self.metrics.set("outbox_oldest_seconds", values["oldest_seconds"], kind=kind)
        self.metrics.set("classifier_backlog", backlog["classifier"]["count"])
        self.metrics.set("classifier_oldest_seconds", backlog["classifier"]["oldest_seconds"])

    async def status_line(self) -> str:
        """STATUS= for systemctl status: one line an operator reads at a glance."""
        try:
            backlog = await self.backlog()
        except Exception as exc:
            return f"database unavailable ({type(exc).__name__})"
        outbox = backlog["outbox"]
        queued = sum(v["count"] for v in outbox.values())
        oldest = max((v["oldest_seconds"] for v in outbox.values()), default=0.0)
        classifier = backlog["classifier"]
        return (
            f"backlog: {classifier['count']} to classify, {queued} to send (oldest {oldest:.0f} s)"
        )

    async def _classify_loop(self) -> None:
        await classify_loop(self.classifier, self.outbox.notify, self.log, self.clock)

    async def drain(self) -> None:
        """Process and send everything due now (tests run without background tasks)."""
        await self.classifier.drain()
        await self.outbox.drain()

    async def stop(self) -> None:
        if self.smtp_server is not None:
            self.smtp_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.smtp_server.wait_closed(), timeout=5)
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        if self.worker is not None:
            await self.worker.stop()
        with contextlib.suppress(TimeoutError):  # let the rows on the wire be marked sent
            await asyncio.wait_for(self.outbox.delivering.acquire(), timeout=10)
        with contextlib.suppress(Exception):  # the rest of our claimed batch goes back
            await self.outbox.release_claims()
        with contextlib.suppress(Exception):
            await self.classifier.release_claims()
        for task in reversed(self.tasks):
            task.cancel()
        if self.tasks:  # bounded: a stuck task must not keep the process from exiting
            _, stuck = await asyncio.wait(self.tasks, timeout=10)
            for task in stuck:
                self.log.error("task.stuck_on_stop", task=task.get_name())
        self.tasks.clear()
        await self.db.dispose()
        self.lock.release()
        self.log.info("daemon.stopped")


async def classify_loop(
    classifier: Classifier, sent: Callable[[], None], log: Any, clock: Clock, poll: float = 0.5
) -> None:
    """Classify what is due; a database outage backs off and never ends the loop."""
    backoff = 0.5
    while True:
        try:
            handled = await classifier.drain()
            backoff = 0.5
            classifier.failing_since = None
            if handled:
                sent()
        except Exception as exc:
            classifier.failing_since = classifier.failing_since or clock.monotonic()
            log.error("classify.loop_error", error=f"{type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            continue
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(poll):  # not wait_for: it can swallow a cancel
                await classifier.wakeup.wait()
        classifier.wakeup.clear()


STATUS_FD_VAR = "IQMAILD_STATUS_FD"


def worker_report(outbox: OutboxWorker, classifier: Classifier, metrics: Metrics) -> bytes:
    """What the worker tells the daemon each second: its metrics' totals, the relay's
    last success and failure, whether its stages fail (monotonic times: one machine)."""
    failure = outbox.last_relay_failure
    report = {
        "metrics": metrics.snapshot(),
        "relay_success": outbox.last_relay_success,
        "relay_failure": failure[0] if failure else None,
        "relay_error": failure[1] if failure else None,
        "relay_failing_since": outbox.relay_failing_since,
        "classifier_failing_since": classifier.failing_since,
        "outbox_failing_since": outbox.failing_since,
    }
    return json.dumps(report, separators=(",", ":")).encode() + b"\n"


class Supervisor:
    """The worker process: started with the validated config on its stdin, woken by a
    byte per commit, restarted when it dies. Its stdin closing (we died) stops it."""

    def __init__(self, config: Config, log: Any, metrics: Metrics | None = None) -> None:
        self.config = config
        self.log = log
        self.metrics = metrics
        self.status: dict[str, Any] = {}  # the worker's last report (see worker_report)
        self._reader: asyncio.Task[None] | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.restarts = 0
        self.reloaded: Config | None = None  # a restarted worker gets the last reload too

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        # A pipe of its own for the worker's reports (metrics, relay, failures).
        read_end, write_end = os.pipe()
        env = child_environment()
        env[STATUS_FD_VAR] = str(write_end)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # not the working directory first on sys.path: the installed iqmaild
                "-m",
                "iqmaild.worker",
                stdin=asyncio.subprocess.PIPE,
                stdout=None,  # JSON lines, like ours: journald keeps both
                stderr=None,
                env=env,
                pass_fds=(write_end,),
            )
        finally:
            os.close(write_end)
        self._reader = asyncio.create_task(self._read_reports(read_end), name="worker-reports")
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.config.model_dump_json(by_alias=True).encode() + b"\n")
        if self.reloaded is not None:
            self.reload(self.reloaded)

    def reload(self, config: Config) -> None:
        """Hand a reloaded config to the worker: ``C`` + its JSON + newline on stdin
        (a lone ``w`` is a wake-up)."""
        self.reloaded = config
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            proc.stdin.write(b"C" + config.model_dump_json(by_alias=True).encode() + b"\n")

    def wake(self) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return
        with contextlib.suppress(Exception):
            proc.stdin.write(b"w")

    async def _read_reports(self, fd: int) -> None:
        """The worker's reports, one JSON line a second, until its end of the pipe closes."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            while line := await reader.readline():
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                self.status = report
                if self.metrics is not None:
                    self.metrics.merge_remote(report.get("metrics", ()))
        finally:
            transport.close()
            if self.metrics is not None:  # its totals stay: counters never go back
                self.metrics.remote_restarted()
            self.status = {}

    async def run(self) -> None:
        delay = 1.0
        while not self.stopping:
            assert self.proc is not None
            code = await self.proc.wait()
            if self._reader is not None:
                await asyncio.wait([self._reader], timeout=5)
            if self.stopping:
                return
            self.restarts += 1
            self.log.error("worker.died", returncode=code, restarts=self.restarts)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)
            await self.start()

    async def stop(self) -> None:
        self.stopping = True
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the worker finishes what is on the wire and exits
        try:
            async with asyncio.timeout(20):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            await asyncio.wait([self._reader], timeout=5)
