"""Commands that run or prepare the daemon: serve, migrate, check-config."""

from __future__ import annotations

import asyncio
import resource
import signal

import click
from sqlalchemy.exc import SQLAlchemyError

from iqmaild import logs
from iqmaild.cli import main
from iqmaild.cli.common import Fail, config_of
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
        f"database {config.database.url.split(':', 1)[0]}"
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
    """Run the daemon (SMTP/LMTP listener, classifier, outbox, HTTP) until SIGTERM."""
    config = config_of(ctx)
    logs.configure(config.logging.level)
    _raise_fd_limit()
    from iqmaild.service import Daemon

    async def main_loop() -> None:
        daemon = Daemon(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await daemon.start()
        try:
            await stop.wait()
        finally:
            await daemon.stop()

    try:
        asyncio.run(main_loop())
    except (schema.SchemaOutdated, InstanceRunning) as exc:
        raise Fail(str(exc)) from None
    except OSError as exc:
        raise Fail(f"cannot start: {exc}") from None
    except SQLAlchemyError as exc:
        raise Fail(f"database.url: {str(exc).splitlines()[0]}") from None
