from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from iqmaild import logs
from tests.harness import Harness, start_harness, stop_harness


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    logs.configure("warning")


@pytest.fixture
async def desk(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path)
    try:
        yield h
    finally:
        await stop_harness(h)
