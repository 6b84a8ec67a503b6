"""Alembic wiring: apply migrations and check that the schema is current."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from iqmaild.storage.db import Database


class SchemaOutdated(Exception):
    """The database is not at the migration head; `iqmaild migrate` fixes it."""


def migrations_dir() -> Path:
    """Shipped inside the wheel as iqmaild/migrations; top-level in a checkout."""
    installed = Path(__file__).resolve().parent.parent / "migrations"
    if (installed / "env.py").exists():
        return installed
    return Path(__file__).resolve().parent.parent.parent / "migrations"


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


async def current_revisions(db: Database) -> set[str]:
    def read(conn: Any) -> set[str]:
        return set(MigrationContext.configure(conn).get_current_heads())

    async with db.engine.connect() as conn:
        return await conn.run_sync(read)


async def upgrade(db: Database, revision: str = "head") -> None:
    cfg = alembic_config()

    def run(conn: Any) -> None:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)

    async with db.engine.begin() as conn:
        await conn.run_sync(run)


async def ensure_current(db: Database) -> None:
    current, head = await current_revisions(db), head_revisions()
    if current != head:
        found = ", ".join(sorted(current)) or "none (empty database)"
        raise SchemaOutdated(
            f"database schema is at revision {found}, this version needs "
            f"{', '.join(sorted(head))}: run `iqmaild migrate`"
        )
