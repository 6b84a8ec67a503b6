"""Commands that run or prepare the daemon: serve, migrate, check-config."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import time
from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from iqmaild import logs
from iqmaild.cli import main
from iqmaild.cli.common import Fail, config_of
from iqmaild.config import ConfigError, load_config
from iqmaild.storage import schema
from iqmaild.storage.db import Database, InstanceRunning


def _raise_fd_limit() -> None:
    """Use the hard limit of open files (systemd's default soft limit is 1024)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the config file and say so in one line."""
    config = config_of(ctx)
    click.echo(
        f"config ok: smtp {config.smtp.listen}, http {config.http.listen}, "
        f"database {config.database.url.split(':', 1)[0]}, "
        f"key ids {', '.join(map(str, config.keys.ids))} (the first signs)"
    )


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the database schema."""
    config = config_of(ctx)

    async def work() -> set[str]:
        db = Database(config.database.url)
        try:
            await schema.upgrade(db)
            return await schema.current_revisions(db)
        finally:
            await db.dispose()

    try:
        revisions = asyncio.run(work())
    except Exception as exc:
        raise Fail(f"migration failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    click.echo(f"database at revision {', '.join(sorted(revisions))}")


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the daemon (SMTP/LMTP listener, classifier, outbox, HTTP) until SIGTERM.

    Under systemd (``Type=notify``): READY=1 once the listeners are up and the
    schema is checked, STATUS= with the backlog, WATCHDOG=1 from the event loop,
    STOPPING=1 on SIGTERM. SIGHUP re-reads the config file and applies what can
    change live; an invalid file is refused and logged, the old config stays.
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop's handler: never fatal
    config = config_of(ctx)
    logs.configure(config.logging.level)
    _raise_fd_limit()
    from iqmaild.service import Daemon
    from iqmaild.systemd import Notifier

    async def main_loop() -> None:
        daemon = Daemon(config)
        notifier = Notifier()
        stop = asyncio.Event()
        hup = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, hup.set)  # before start: a HUP never ends us
        _test_hooks(loop, daemon.log)
        await daemon.start()
        tasks = [
            asyncio.create_task(notifier.feed_watchdog(), name="watchdog"),
            asyncio.create_task(_reloads(ctx, daemon, hup, notifier), name="reload"),
            asyncio.create_task(_status(daemon, notifier), name="status"),
        ]
        notifier.notify(READY=1, STATUS=await daemon.status_line(), MAINPID=os.getpid())
        try:
            await stop.wait()
        finally:
            notifier.notify(STOPPING=1, STATUS="stopping")
            for task in tasks:
                task.cancel()
            await daemon.stop()
            notifier.close()

    try:
        asyncio.run(main_loop())
    except (schema.SchemaOutdated, InstanceRunning) as exc:
        raise Fail(str(exc)) from None
    except OSError as exc:
        raise Fail(f"cannot start: {exc}") from None
    except SQLAlchemyError as exc:
        raise Fail(f"database.url: {str(exc).splitlines()[0]}") from None


async def _reloads(ctx: click.Context, daemon: Any, hup: asyncio.Event, notifier: Any) -> None:
    """SIGHUP: re-read the config file; an invalid one is refused and the old one kept."""
    while True:
        await hup.wait()
        hup.clear()
        notifier.notify(RELOADING=1, STATUS="reloading")
        try:
            new = load_config(ctx.obj["config_path"])
        except ConfigError as exc:
            daemon.log.error("daemon.reload_refused", error=str(exc)[:500])
        else:
            try:
                await daemon.reload(new)
            except Exception as exc:  # a reload must never end the daemon
                daemon.log.error("daemon.reload_failed", error=f"{type(exc).__name__}: {exc}")
        notifier.notify(READY=1, STATUS=await daemon.status_line())


async def _status(daemon: Any, notifier: Any, every: float = 10.0) -> None:
    """STATUS= with the backlog, for ``systemctl status``."""
    if not notifier.enabled:
        return
    while True:
        await asyncio.sleep(every)
        notifier.notify(STATUS=await daemon.status_line())


def _test_hooks(loop: asyncio.AbstractEventLoop, log: Any) -> None:
    """Only with IQMAILD_TEST_HOOKS=1 (tests): SIGUSR2 blocks the event loop for
    IQMAILD_TEST_BLOCK_SECONDS, as a stuck coroutine would; the watchdog must starve."""
    if os.environ.get("IQMAILD_TEST_HOOKS") != "1":
        return
    seconds = float(os.environ.get("IQMAILD_TEST_BLOCK_SECONDS", "3"))

    def block() -> None:
        log.warning("test.blocking_loop", seconds=seconds)
        time.sleep(seconds)  # deliberately blocking: that is the fault under test
        log.warning("test.loop_unblocked")

    loop.add_signal_handler(signal.SIGUSR2, block)
