from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from iqmaild import logs
from tests.harness import Harness, start_harness, stop_harness
from tests.pg import drop_template, psql, temp_database


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    logs.configure("warning")


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(autouse=True, scope="session")
def _drop_pg_template() -> Iterator[None]:
    yield
    drop_template()


@asynccontextmanager
async def harness_on(backend: str, tmp_path: Path, **sections: Any) -> AsyncIterator[Harness]:
    if backend == "sqlite":
        h = await start_harness(tmp_path, **sections)
        try:
            yield h
        finally:
            await stop_harness(h)
        return
    async with temp_database() as url:
        h = await start_harness(tmp_path, db_url=url, **sections)
        try:
            yield h
        finally:
            await stop_harness(h)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each back end: the whole suite runs on SQLite and on PostgreSQL."""
    return str(request.param)


@pytest.fixture
async def desk(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """The daemon on a real database: SQLite (the embedded default) and PostgreSQL."""
    async with harness_on(backend, tmp_path) as h:
        yield h


@pytest.fixture
async def any_desk(desk: Harness) -> Harness:
    return desk  # every desk is on both back ends now


@pytest.fixture
async def sqlite_desk(tmp_path: Path) -> AsyncIterator[Harness]:
    """For what only SQLite has (its file, its instance lock, WAL)."""
    async with harness_on("sqlite", tmp_path) as h:
        yield h


class Sabotage:
    """Real faults in the daemon's database, made from outside it, on either back end."""

    def __init__(self, url: str) -> None:
        self.url = url

    def sql(self, statement: str) -> None:
        if self.url.startswith("sqlite"):
            with sqlite3.connect(self.url.split(":///", 1)[1], timeout=15) as conn:
                conn.execute(statement)
        else:
            psql(self.url, statement)

    def rename(self, old: str, new: str) -> None:
        self.sql(f"ALTER TABLE {old} RENAME TO {new}")

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        """What is committed, read through a connection of its own."""
        if self.url.startswith("sqlite"):
            with sqlite3.connect(self.url.split(":///", 1)[1], timeout=15) as conn:
                return list(conn.execute(query))
        out = psql(self.url, query)
        return [tuple(line.split("|")) for line in out.splitlines() if line]


@pytest.fixture
def sabotage(desk: Harness) -> Sabotage:
    return Sabotage(desk.config.database.url)


@pytest.fixture
def break_messages_table(sabotage: Sabotage):
    """Make the real database refuse the intake: rename the messages table away."""

    def apply(broken: bool) -> None:
        old, new = ("messages", "messages_away") if broken else ("messages_away", "messages")
        sabotage.rename(old, new)

    return apply
