"""The one place that wires the adapters around the core and runs them."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from iqmaild import logs
from iqmaild.apply.desk import Desk
from iqmaild.classify.batch import Classifier
from iqmaild.config import Config, split_host_port
from iqmaild.deliver.outbox import OutboxWorker
from iqmaild.ingest.smtp import DeskHandler, start_listener
from iqmaild.persist.store import GroupCommitter, Incoming
from iqmaild.rendering import Renderer
from iqmaild.storage import schema
from iqmaild.storage.db import Database
from iqmaild.web.app import WebApp, start_http


def build_desk(config: Config, log: Any | None = None) -> Desk:
    override = Path(config.templates.override_dir) if config.templates.override_dir else None
    return Desk(
        config=config, renderer=Renderer(override_dir=override), log=log or logs.get("iqmaild")
    )


class Daemon:
    """Owns every task and server of one instance; ``start``/``stop`` in one loop."""

    def __init__(self, config: Config, log: Any | None = None) -> None:
        self.config = config
        self.log = log or logs.get("iqmaild")
        self.db = Database(config.database.url, config.database.pool_size)
        self.desk = build_desk(config, self.log)
        self.outbox = OutboxWorker(
            self.db, config, self.log, self.desk.metrics, composer=self.desk.composer
        )
        self.classifier = Classifier(self.db, self.desk, on_processed=self.outbox.notify)
        self.committer = GroupCommitter(self.db, config.smtp.group_commit_max, self._committed)
        self.web = WebApp(
            self.db, self.desk, self._intake_now, self.problems, queued=self.outbox.notify
        )
        self._probe: tuple[float, str | None] = (float("-inf"), None)
        self.tasks: list[asyncio.Task[Any]] = []
        self.smtp_server: asyncio.AbstractServer | None = None
        self.smtp_limits: Any = None
        self.http_runner: Any = None
        self.smtp_port = 0
        self.http_port = 0

    def _committed(self) -> None:
        self.classifier.notify()

    async def _intake_now(self, item: Incoming) -> int:
        """Store and classify at once: the panel answers with the ticket number."""
        stored = await self.committer.store(item)
        await self.classifier.process(stored.id)
        self.outbox.notify()
        return stored.id

    async def start(self, *, background: bool = True) -> None:
        asyncio.get_running_loop().set_exception_handler(logs.LoopErrors(self.log))
        await schema.ensure_current(self.db)
        requeued = await self.outbox.recover()
        handler = DeskHandler(self.config, self.committer, self.log, self.desk.metrics)
        self.smtp_server, self.smtp_port, self.smtp_limits = await start_listener(
            self.config, handler, self.log
        )
        host, port = split_host_port(self.config.http.listen)
        self.http_runner, self.http_port = await start_http(
            self.web, host, port, self.config.http.max_connections
        )
        self._spawn(self.committer.run(), "group-commit")
        if background:
            self._spawn(self._classify_loop(), "classify")
            self._spawn(self.outbox.run(), "outbox")
        self.log.info(
            "daemon.started",
            smtp_port=self.smtp_port,
            http_port=self.http_port,
            protocol=self.config.smtp.protocol,
            requeued_outbox=requeued,
        )

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._task_ended)
        self.tasks.append(task)

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        self.log.critical(
            "task.died", task=task.get_name(), error=f"{type(error).__name__}: {error}"[:300]
        )

    async def problems(self) -> list[str]:
        """What /healthz reports besides the database: stopped tasks, intake that cannot commit.

        Reads alone prove little (a full disk still reads): health says whether
        intake commits, from intake's own last attempt or, when idle, a probe write.
        """
        out = [f"task {t.get_name()} stopped" for t in self.tasks if t.done()]
        loop = asyncio.get_running_loop()
        committer = self.committer
        idle = committer.last_success is None or loop.time() - committer.last_success > 30
        if committer.failed_since is not None or idle:
            when, error = self._probe
            # While intake fails, probe every second: health turns back to ok once
            # the database takes writes again, with or without new mail.
            if loop.time() - when > (1 if committer.failed_since is not None else 5):
                error = await committer.probe()  # clears failed_since when it commits
                self._probe = (loop.time(), error)
            if committer.failed_since is not None:
                since = loop.time() - committer.failed_since
                out.append(f"intake cannot commit (for {since:.0f} s)")
            elif error:
                out.append(f"database does not accept writes: {error}")
        for stage, failing in (
            ("classification", self.classifier.failing_since),
            ("outbox", self.outbox.failing_since),
        ):
            if failing is not None and loop.time() - failing > 10:
                out.append(f"{stage} has been failing for {loop.time() - failing:.0f} s")
        return out

    async def _classify_loop(self) -> None:
        """Classify what is due; a database outage backs off and never ends the loop."""
        backoff = 0.5
        while True:
            try:
                handled = await self.classifier.drain()
                backoff = 0.5
                self.classifier.failing_since = None
                if handled:
                    self.outbox.notify()
            except Exception as exc:
                loop_now = asyncio.get_running_loop().time()
                self.classifier.failing_since = self.classifier.failing_since or loop_now
                self.log.error("classify.loop_error", error=f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):  # not wait_for: it can swallow a cancel
                    await self.classifier.wakeup.wait()
            self.classifier.wakeup.clear()

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
        with contextlib.suppress(TimeoutError):  # let the row on the wire be marked sent
            await asyncio.wait_for(self.outbox.delivering.acquire(), timeout=10)
        with contextlib.suppress(Exception):  # the rest of our claimed batch goes back
            await self.outbox.release_claims()
        for task in reversed(self.tasks):
            task.cancel()
        if self.tasks:  # bounded: a stuck task must not keep the process from exiting
            _, stuck = await asyncio.wait(self.tasks, timeout=10)
            for task in stuck:
                self.log.error("task.stuck_on_stop", task=task.get_name())
        self.tasks.clear()
        await self.db.dispose()
        self.log.info("daemon.stopped")
