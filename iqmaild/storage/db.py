"""The database handle: engine, transactions, SQLite durability settings.

SQLite runs in WAL with ``synchronous=FULL`` (NORMAL can lose a committed row on
power loss, and we answer 250 after the commit). Write transactions start with
``BEGIN IMMEDIATE`` so that a writer never has to upgrade a read lock, and are
serialized inside the process by an asyncio lock and across processes (intake,
the worker, the CLI) by `WriteTurns`; reads run on their own engine with a
deferred BEGIN. PostgreSQL needs none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event, exc, make_url, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


def is_outage(error: BaseException) -> bool:
    """The database itself failed (down, locked, full, a table gone), not one row's data.

    Such a failure is no message's fault: it is retried with backoff, never counted
    against a message (a long outage must not park good mail as dead letters).
    """
    if isinstance(error, exc.DBAPIError) and not isinstance(
        error, exc.OperationalError | exc.InterfaceError | exc.ProgrammingError
    ):
        return bool(error.connection_invalidated)
    return isinstance(
        error,
        exc.OperationalError
        | exc.InterfaceError
        | exc.ProgrammingError
        | exc.DisconnectionError
        | exc.TimeoutError
        | OSError
        | TimeoutError,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        "PRAGMA foreign_keys=ON",
        "PRAGMA busy_timeout=15000",
    ):
        cursor.execute(pragma)
    cursor.close()


def _sqlite_begin_immediate(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_deferred(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN")


# How often a writer steps aside for intake (YIELD_SECONDS each) before it takes
# its turn anyway: interactive writes (a link click) soon, background work (the
# classifier, the outbox) only after a burst or every couple of seconds.
MAX_YIELDS = {"normal": 4, "background": 40}
YIELD_SECONDS = 0.05


FILE_MODE = 0o600  # the database holds customers' mail: owner only


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file owner-only before SQLite does (it would use 0644);
    its -wal and -shm files take the same mode. A wider existing file is narrowed."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, FILE_MODE)
        os.close(fd)
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            os.chmod(path, FILE_MODE)
    except OSError:
        pass  # SQLite reports the real problem with a better message


class InstanceRunning(Exception):
    """Another daemon runs on this SQLite file."""


class InstanceLock:
    """One daemon per SQLite file: an exclusive lock on ``<file>.lock``, taken before
    anything touches the database and held until the process ends. (PostgreSQL is
    where several instances share a database; there this is a no-op.)"""

    def __init__(self, url: str) -> None:
        database = make_url(url).database if url.startswith("sqlite") else None
        self.path = Path(f"{database}.lock") if database and database != ":memory:" else None
        self.fd: int | None = None

    def acquire(self) -> None:
        if self.path is None or self.fd is not None:
            return
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceRunning(
                f"another iqmaild serve is running on this database ({self.path} is locked)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class WriteTurns:
    """Whose turn it is to write one SQLite file, across the processes that share it.

    SQLite's own busy handler sleeps up to 100 ms between tries, and cannot tell
    intake (an MTA waiting for its 250) from background work: a worker in another
    process would keep the 250s waiting. Writers take an ``flock`` on
    ``<file>.write`` (tried every millisecond or so), and intake raises a flag in
    that file's first byte while it waits, which background writers elsewhere
    honour as they do intake in their own process.
    """

    WAIT_SECONDS = 15.0  # as long as SQLite's busy_timeout; then the caller answers 451

    def __init__(self, database: str) -> None:
        self.path = Path(f"{database}.write")
        self.fd: int | None = None
        self.flag: mmap.mmap | None = None
        self.held = False

    def _open(self) -> bool:
        if self.fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, FILE_MODE)
        except OSError:
            return False  # no place for it: SQLite's busy handler still serializes
        try:
            if os.fstat(fd).st_size < 1:
                os.pwrite(fd, b"\0", 0)
            self.flag = mmap.mmap(fd, 1)
        except (OSError, ValueError):
            os.close(fd)
            return False
        self.fd = fd
        return True

    def ask(self, waiting: bool) -> None:
        """Intake waits (True) or no longer does (False)."""
        if self._open() and self.flag is not None:
            self.flag[0] = 1 if waiting else 0

    def asked(self) -> bool:
        """Intake in some process waits for its turn."""
        return self._open() and self.flag is not None and self.flag[0] == 1

    async def take(self, urgent: bool) -> None:
        if not self._open() or self.fd is None:
            return
        delay, ceiling, waited = 0.0002, (0.001 if urgent else 0.004), 0.0
        while True:  # the wait is bounded by the sleeps' sum (no clock read here)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.held = True
                return
            except BlockingIOError:
                if waited > self.WAIT_SECONDS:
                    raise TimeoutError(f"{self.path} held by another process") from None
            await asyncio.sleep(delay)
            waited += delay
            delay = min(delay * 2, ceiling)

    def give(self) -> None:
        if self.held and self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False

    async def wait_unasked(self, seconds: float) -> None:
        """Step aside while intake elsewhere waits, for at most ``seconds``."""
        for _ in range(max(1, int(seconds / 0.001))):
            if not self.asked():
                return
            await asyncio.sleep(0.001)

    def close(self) -> None:
        self.give()
        if self.flag is not None:
            self.flag.close()
            self.flag = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Database:
    def __init__(self, url: str, pool_size: int = 5, echo: bool = False) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            _private_sqlite_file(url)
        # Parameters hold customer data (and raw tokens in outbox rows): keep them
        # out of exception texts that reach logs and last_error columns.
        kwargs: dict[str, Any] = {
            "echo": echo,
            "hide_parameters": True,
            "pool_pre_ping": not self.is_sqlite,
        }
        if not self.is_sqlite:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        self.read_engine = self.engine
        if self.is_sqlite:
            # Writers take the lock up front; readers use a deferred BEGIN so that,
            # under WAL, they never wait for (or block) the group committer.
            self.read_engine = create_async_engine(url, **kwargs)
            for engine, begin in (
                (self.engine, _sqlite_begin_immediate),
                (self.read_engine, _sqlite_begin_deferred),
            ):
                event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
                event.listen(engine.sync_engine, "begin", begin)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.read_sessions = async_sessionmaker(self.read_engine, expire_on_commit=False)
        self._write_lock = asyncio.Lock() if self.is_sqlite else None
        database = make_url(url).database if self.is_sqlite else None
        file_backed = bool(database) and database != ":memory:" and not database.startswith("file:")
        self._turns = WriteTurns(database) if file_backed and database else None
        # Intake (the 250s the MTA waits for) goes before background writers.
        self._urgent_waiting = 0
        self._no_urgent = asyncio.Event()
        self._no_urgent.set()

    @asynccontextmanager
    async def transaction(
        self, priority: Literal["intake", "normal", "background"] = "normal"
    ) -> AsyncIterator[AsyncSession]:
        """A write transaction, committed when the block ends without error.

        On SQLite writes are serialized; intake (the 250s the MTA waits for) is
        served before the others, in this process and in the others sharing the
        file, which step aside a bounded number of times.
        """
        if self._write_lock is None:
            async with self.sessions() as session, session.begin():
                yield session
            return
        await self._take_turn(priority)
        try:
            async with self.sessions() as session, session.begin():
                yield session
        finally:
            self._give_turn()

    def _intake_elsewhere(self) -> bool:
        return self._turns is not None and self._turns.asked() and not self._urgent_waiting

    async def _take_turn(self, priority: Literal["intake", "normal", "background"]) -> None:
        assert self._write_lock is not None
        turns = self._turns
        if priority == "intake":
            self._urgent_waiting += 1
            self._no_urgent.clear()
            if turns is not None:
                turns.ask(True)
            try:
                await self._write_lock.acquire()
                try:
                    if turns is not None:
                        await turns.take(urgent=True)
                except BaseException:
                    self._write_lock.release()
                    raise
            finally:
                self._urgent_waiting -= 1
                if not self._urgent_waiting:
                    self._no_urgent.set()
                    if turns is not None:
                        turns.ask(False)
            return
        limit = MAX_YIELDS[priority]
        for yielded in range(limit + 1):
            last = yielded == limit
            if not last and not self._no_urgent.is_set():
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a
                # cancellation that arrives as the event fires (a task then
                # survives Daemon.stop()).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(YIELD_SECONDS):
                        await self._no_urgent.wait()
            elif not last and turns is not None and self._intake_elsewhere():
                await turns.wait_unasked(YIELD_SECONDS)
            await self._write_lock.acquire()
            if not last and (self._urgent_waiting or self._intake_elsewhere()):
                self._write_lock.release()  # intake came in meanwhile: let it go first
                continue
            try:
                if turns is not None:
                    await turns.take(urgent=False)
            except BaseException:
                self._write_lock.release()
                raise
            return

    def _give_turn(self) -> None:
        if self._turns is not None:
            self._turns.give()
        assert self._write_lock is not None
        self._write_lock.release()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only session; on SQLite it never takes the write lock."""
        async with self.read_sessions() as session:
            yield session

    async def ping(self) -> bool:
        try:
            async with self.read_sessions() as session:
                await session.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    async def dispose(self) -> None:
        if self._turns is not None:
            self._turns.close()
        await self.engine.dispose()
        if self.read_engine is not self.engine:
            await self.read_engine.dispose()
