from __future__ import annotations

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
