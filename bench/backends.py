"""A throwaway database per run: a SQLite file, or a PostgreSQL database.

Preparing a database (``iqmaild migrate`` plus a directory import) can take
longer than the measurement, so a scenario prepares one *template* per back end
and every run gets a fresh copy of it: SQLite through the ``sqlite3`` backup API
(consistent also with a WAL), PostgreSQL with ``CREATE DATABASE ... TEMPLATE``.

PostgreSQL: the server at ``$IQMAILD_BENCH_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, trust auth), driven with
``psql``; the databases are named ``iqbench_<pid>_<n>`` and dropped after the run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import subprocess
from pathlib import Path

from bench.proc import BenchError, MissingTool, find_tool

PG_ADMIN = os.environ.get("IQMAILD_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_names = itertools.count(1)


class Backend:
    name = ""

    @property
    def url(self) -> str:
        raise NotImplementedError

    def clone(self, workdir: Path) -> Backend:
        raise NotImplementedError

    def drop(self) -> None:
        raise NotImplementedError


class SqliteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def url(self) -> str:
        return f"sqlite+aiosqlite:///{self.path}"

    def clone(self, workdir: Path) -> SqliteBackend:
        target = workdir / "iqmaild.db"
        src = sqlite3.connect(self.path)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        return SqliteBackend(target)

    def drop(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(f"{self.path}{suffix}").unlink()

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=60)


def psql(sql: str, dsn: str = PG_ADMIN, stdin: bytes | None = None, timeout: float = 600) -> str:
    try:
        cmd = [find_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", dsn, "-c", sql]
    except MissingTool:
        raise MissingTool("psql not found (package postgresql-client)") from None
    done = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"psql: {done.stderr.decode(errors='replace').strip()[:300]}")
    return done.stdout.decode()


def postgres_available() -> str | None:
    """None when the server answers, else why not."""
    try:
        psql("SELECT 1", timeout=10)
    except (BenchError, subprocess.TimeoutExpired, OSError) as exc:
        return f"PostgreSQL at {PG_ADMIN} not usable: {exc}"
    return None


class PostgresBackend(Backend):
    name = "postgres"

    def __init__(self, database: str) -> None:
        self.database = database

    @classmethod
    def create(cls) -> PostgresBackend:
        name = f"iqbench_{os.getpid()}_{next(_names)}"
        psql(f'CREATE DATABASE "{name}"')
        return cls(name)

    @property
    def dsn(self) -> str:
        return PG_ADMIN.rsplit("/", 1)[0] + "/" + self.database

    @property
    def url(self) -> str:
        return self.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)

    def clone(self, workdir: Path) -> PostgresBackend:
        name = f"iqbench_{os.getpid()}_{next(_names)}"
        psql(f'CREATE DATABASE "{name}" TEMPLATE "{self.database}"')
        return PostgresBackend(name)

    def drop(self) -> None:
        psql(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')


def new_backend(kind: str, workdir: Path) -> Backend:
    if kind == "sqlite":
        return SqliteBackend(workdir / "iqmaild.db")
    if kind == "postgres":
        return PostgresBackend.create()
    raise ValueError(f"unknown back end {kind!r}")
