from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iqmaild import logs
from tests.harness import Harness, start_harness, stop_harness
from tests.pg import temp_database


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    logs.configure("warning")


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Harness]:
    """The daemon on its embedded default, SQLite."""
    h = await start_harness(tmp_path)
    try:
        yield h
    finally:
        await stop_harness(h)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def any_desk(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """The daemon on each back end: both must pass the same tests."""
    if request.param == "sqlite":
        h = await start_harness(tmp_path)
        try:
            yield h
        finally:
            await stop_harness(h)
        return
    async with temp_database() as url:
        h = await start_harness(tmp_path, db_url=url)
        try:
            yield h
        finally:
            await stop_harness(h)


@pytest.fixture
def break_messages_table(tmp_path: Path):
    """Make the real database refuse the intake: rename the messages table away."""

    def apply(broken: bool) -> None:
        old, new = ("messages", "messages_away") if broken else ("messages_away", "messages")
        with sqlite3.connect(tmp_path / "iqmaild.db", timeout=15) as conn:
            conn.execute(f"ALTER TABLE {old} RENAME TO {new}")

    return apply
