"""What every CLI command shares: config loading, running a job, printing rows.

Every problem an operator can cause (bad config, unknown account, outdated
schema) ends in one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from iqmaild.clock import SystemClock
from iqmaild.config import Config, ConfigError, load_config
from iqmaild.storage import schema
from iqmaild.storage.db import Database
from iqmaild.storage.directory import DirectoryError

T = TypeVar("T")

# The CLI is a wiring point of its own: its one clock.
CLOCK = SystemClock()


class Fail(click.ClickException):
    def show(self, file: Any = None) -> None:
        click.echo(f"iqmaild: {self.message}", err=True)


def config_of(ctx: click.Context) -> Config:
    try:
        return load_config(ctx.obj["config_path"])
    except ConfigError as exc:
        raise Fail(str(exc)) from None


def run_job(ctx: click.Context, work: Callable[[Config, Database], Awaitable[T]]) -> T:
    """Run one async job against the configured, migrated database."""
    config = config_of(ctx)

    async def main() -> T:
        db = Database(config.database.url)
        try:
            await schema.ensure_current(db)
            return await work(config, db)
        finally:
            await db.dispose()

    try:
        return asyncio.run(main())
    except (DirectoryError, schema.SchemaOutdated, LookupError, ValueError) as exc:
        raise Fail(str(exc)) from None
    except OSError as exc:
        raise Fail(f"database: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith("sqlalchemy"):
            raise Fail(f"database: {str(exc).splitlines()[0]}") from None
        raise


def emit(rows: list[dict[str, Any]], as_json: bool, columns: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, default=str, indent=1))
        return
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for row in rows:
        click.echo("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))
