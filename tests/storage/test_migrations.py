"""Models and migrations agree, on both back ends; serve refuses an old schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text

from iqmaild.storage import schema
from iqmaild.storage.db import Database
from iqmaild.storage.models import Base
from tests.pg import temp_database


async def _diff(db: Database) -> list[Any]:
    def compare(conn: Any) -> list[Any]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with db.engine.connect() as conn:
        return await conn.run_sync(compare)


async def _check(url: str) -> None:
    db = Database(url)
    try:
        with pytest.raises(schema.SchemaOutdated, match="iqmaild migrate"):
            await schema.ensure_current(db)
        await schema.upgrade(db)
        await schema.ensure_current(db)
        assert await _diff(db) == []
        await schema.upgrade(db)  # idempotent
    finally:
        await db.dispose()


async def test_sqlite_migrations_match_models(tmp_path: Path) -> None:
    await _check(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
async def test_postgres_migrations_match_models() -> None:
    async with temp_database(migrated=False) as url:
        await _check(url)


async def test_sqlite_runs_in_wal_with_full_sync(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    try:
        async with db.transaction() as session:
            mode = (await session.execute(text("PRAGMA journal_mode"))).scalar()
            sync = (await session.execute(text("PRAGMA synchronous"))).scalar()
            fks = (await session.execute(text("PRAGMA foreign_keys"))).scalar()
        assert (mode, sync, fks) == ("wal", 2, 1)  # 2 = FULL
    finally:
        await db.dispose()


async def test_background_writers_still_get_turns_under_sustained_intake(tmp_path: Path) -> None:
    """Intake goes first on SQLite, but never forever: a link click must not hang."""
    import asyncio

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    await schema.upgrade(db)
    stop = asyncio.Event()

    async def intake() -> None:
        while not stop.is_set():
            async with db.transaction(priority="intake") as session:
                await session.execute(text("SELECT 1"))

    producers = [asyncio.create_task(intake()) for _ in range(20)]
    try:
        async with asyncio.timeout(30):  # liveness, not a timing claim
            for _ in range(3):
                async with db.transaction() as session:
                    await session.execute(text("SELECT 1"))
    finally:
        stop.set()
        await asyncio.gather(*producers)
        await db.dispose()


async def test_the_database_files_are_owner_only(tmp_path: Path) -> None:
    """The database holds customers' mail: 0600, and SQLite's -wal/-shm follow it."""
    import os
    import stat

    path = tmp_path / "private.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await schema.upgrade(db)
        async with db.transaction() as session:
            await session.execute(text("SELECT 1"))
        files = [p for p in tmp_path.iterdir() if p.name.startswith("private.db")]
        assert {p.name for p in files} >= {"private.db", "private.db-wal", "private.db-shm"}
        for p in files:
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p.name
    finally:
        await db.dispose()
