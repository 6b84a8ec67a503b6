"""A throwaway PostgreSQL database per test, on the server at 127.0.0.1:5432.

Each one is a copy of a template migrated once per test session (CREATE
DATABASE ... TEMPLATE): a hundred milliseconds instead of a migration.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

PG_ADMIN = os.environ.get("IQMAILD_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
BASE = PG_ADMIN.rsplit("/", 1)[0]
_template: dict[str, str] = {}
_template_lock = threading.Lock()


def _make_template() -> str:
    """Migrate one database for this session to copy from (in a thread of its own loop)."""
    from iqmaild.storage import schema
    from iqmaild.storage.db import Database

    name = f"iqmaild_tpl_{uuid.uuid4().hex[:10]}"

    async def build() -> None:
        import asyncpg

        admin = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        db = Database(f"{BASE.replace('postgresql://', 'postgresql+asyncpg://')}/{name}")
        try:
            await schema.upgrade(db)
        finally:
            await db.dispose()

    result: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(build())
        except BaseException as exc:  # reported to the caller below
            result.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if result:
        raise result[0]
    return name


def template() -> str:
    with _template_lock:
        if "name" not in _template:
            _template["name"] = _make_template()
        return _template["name"]


@asynccontextmanager
async def temp_database(migrated: bool = True) -> AsyncIterator[str]:
    asyncpg = pytest.importorskip("asyncpg")
    try:
        admin = await asyncpg.connect(PG_ADMIN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN}: {exc}")
    name = f"iqmaild_test_{uuid.uuid4().hex[:12]}"
    if migrated:
        source = await asyncio.to_thread(template)
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    else:
        await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{BASE.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def drop_template() -> None:
    """At the end of the session (conftest)."""
    name = _template.pop("name", None)
    if name:
        psql(PG_ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def psql(url: str, sql: str) -> str:
    """Run SQL through psql (synchronous: from a relay callback, say)."""
    url = url.replace("postgresql+asyncpg://", "postgresql://")
    result = subprocess.run(
        ["psql", url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout
