"""Durable intake with group commit: many messages, one commit, each 250 after it.

Concurrent deliveries share one transaction (one multi-row INSERT); each
session's 250 waits for that commit. A delivery repeated by the MTA (a lost
250), by IMAP or by another instance is stored once: (SHA-256 of the raw bytes,
Message-ID) is a unique index and the INSERT skips what is there; a different
message reusing a Message-ID is kept. One bad message never fails its group:
the group is retried one message at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite

from iqmaild.clock import Clock
from iqmaild.storage.db import Database, is_outage
from iqmaild.storage.models import MESSAGE_ID_LIMIT, Message

_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_MSGID = re.compile(
    rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE
)


@dataclass
class Incoming:
    raw: bytes
    mail_from: str
    rcpt_to: list[str]
    channel: str = "smtp"
    peer: str = ""
    account_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @property
    def message_id(self) -> str:
        head = self.raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        match = _HEADER_MSGID.search(head)
        if match is None:
            return ""
        # A key for duplicate detection, safe on every back end (PostgreSQL refuses
        # NUL in text): controls and 8-bit become visible escapes.
        text = match.group(1).decode("ascii", "backslashreplace").strip()
        return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:MESSAGE_ID_LIMIT]


@dataclass(frozen=True)
class Stored:
    id: int
    duplicate: bool


class GroupCommitter:
    """Batches concurrent `store` calls into one transaction."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        max_batch: int,
        on_commit: Callable[[], None],
        metrics: Any = None,
    ) -> None:
        self.db = db
        self.metrics = metrics  # stage_seconds{stage="commit"}
        self.clock = clock
        self.max_batch = max_batch
        self.on_commit = on_commit
        self.queue: asyncio.Queue[tuple[Incoming, asyncio.Future[Stored]]] = asyncio.Queue()
        self.batches = 0
        # For /healthz: can intake commit? (monotonic times; failed_since None = fine)
        self.last_attempt: float | None = None
        self.last_success: float | None = None
        self.failed_since: float | None = None
        self.last_failure: float | None = None  # the latest real intake commit that failed

    # A probe row is small: on a nearly full disk it commits while real mail still
    # gets 451. It turns health back to ok only once intake has not failed this long.
    PROBE_TRUSTED_AFTER = 10.0

    async def store(self, item: Incoming) -> Stored:
        future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, future))
        return await future

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            live = [(item, fut) for item, fut in batch if not fut.done()]
            if not live:
                continue
            try:
                results = await self._commit([item for item, _ in live])
            except Exception as exc:
                if len(live) == 1:
                    _settle(live[0][1], exc)
                    continue
                # One bad message must not fail its neighbours: each alone, once.
                for item, fut in live:
                    try:
                        _settle(fut, (await self._commit([item]))[0])
                    except Exception as single:
                        _settle(fut, single)
                self.on_commit()
                continue
            self.batches += 1
            for (_, fut), result in zip(live, results, strict=True):
                _settle(fut, result)
            self.on_commit()

    async def store_batch(
        self, items: list[Incoming], also: Callable[[Any, list[Stored]], Awaitable[None]]
    ) -> list[Stored]:
        """Store a batch that must commit with something else, in one transaction.

        IMAP intake commits its messages with the folder's last UID and the
        list of messages to file: a crash before the commit takes them again
        (nothing skipped), after it takes none twice.
        """
        stored = await self._commit(items, also)
        self.batches += 1
        self.on_commit()
        return stored

    async def probe(self) -> str | None:
        """Can intake commit? A row written and removed in one real commit; None when fine."""
        item = Incoming(raw=b"", mail_from="", rcpt_to=[], channel="probe")
        try:
            async with self.db.transaction(priority="intake") as session:
                result = await session.execute(
                    insert(Message).returning(Message.id),
                    [_row(item, ("probe", ""), self.clock.now())],
                )
                await session.execute(delete(Message).where(Message.id == result.scalar_one()))
        except Exception as exc:
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        now = self.clock.monotonic()
        if self.last_failure is None or now - self.last_failure >= self.PROBE_TRUSTED_AFTER:
            self.failed_since = None
        return None

    async def _commit(
        self,
        items: list[Incoming],
        also: Callable[[Any, list[Stored]], Awaitable[None]] | None = None,
    ) -> list[Stored]:
        self.last_attempt = started = self.clock.monotonic()
        try:
            stored = await self._insert(items, also)
        except Exception as exc:
            if is_outage(exc):  # one bad message is not the database failing
                self.last_failure = self.clock.monotonic()
                self.failed_since = self.failed_since or self.last_failure
            raise
        self.failed_since = None
        self.last_success = self.clock.monotonic()
        if self.metrics is not None:
            self.metrics.observe("stage_seconds", self.last_success - started, stage="commit")
        return stored

    async def _insert(
        self,
        items: list[Incoming],
        also: Callable[[Any, list[Stored]], Awaitable[None]] | None = None,
    ) -> list[Stored]:
        keys = [(item.sha256, item.message_id) for item in items]  # hash once per item
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        now = self.clock.now()
        for item, key in zip(items, keys, strict=True):
            rows.setdefault(key, _row(item, key, now))
        fresh: dict[tuple[str, str], int] = {}
        async with self.db.transaction(priority="intake") as session:
            dialect = postgresql if not self.db.is_sqlite else sqlite
            statement = (
                dialect.insert(Message)
                .on_conflict_do_nothing(index_elements=["raw_sha256", "message_id"])
                .returning(Message.id, Message.raw_sha256, Message.message_id)
            )
            result = await session.execute(statement, list(rows.values()))
            for row_id, sha, message_id in result:
                fresh[(sha, message_id)] = row_id
            known = dict(fresh)
            missing = [key for key in rows if key not in fresh]
            if missing:  # stored before (a repeated delivery): find what it got
                found = await session.execute(
                    select(Message.raw_sha256, Message.message_id, Message.id).where(
                        tuple_(Message.raw_sha256, Message.message_id).in_(missing)
                    )
                )
                for sha, message_id, row_id in found:
                    known[(sha, message_id)] = row_id
            out: list[Stored] = []
            new = set(fresh)  # the first of identical deliveries in a group is the new one
            for key in keys:
                out.append(Stored(known[key], duplicate=key not in new))
                new.discard(key)
            if also is not None:
                await also(session, out)
        return out


def _row(item: Incoming, key: tuple[str, str], now: Any) -> dict[str, Any]:
    return {
        "channel": item.channel,
        "mail_from": item.mail_from,
        "rcpt_to": item.rcpt_to,
        "peer": item.peer,
        "raw": item.raw,
        "raw_sha256": key[0],
        "message_id": key[1],
        "account_id": item.account_id,
        "headers": dict(item.extra),
        "state": "received",
        "received_at": now,
        "attempts": 0,
        "subject": "",
        "defects": [],
        "reasons": [],
        "rules_hit": [],
        "suppressed": [],
    }


def _settle(future: asyncio.Future[Stored], outcome: Stored | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
