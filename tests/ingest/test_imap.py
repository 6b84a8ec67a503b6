"""IMAP intake's exactly-once logic on both back ends, against an in-memory folder.

The real server is in tests/e2e/test_imap.py (Dovecot); here a fake session
stands in for the connection so a cut mid-backlog and a restart happen at a
chosen point, and the database is SQLite or PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import func, select

from iqmaild.imap.client import ImapDisconnected
from iqmaild.ingest.imap import ImapIntake
from iqmaild.persist import mailbox
from iqmaild.storage.models import Message
from tests.harness import Harness


def raw(n: int, sender: str) -> bytes:
    return (
        f"Return-Path: <{sender}>\r\nDelivered-To: bok@desk.test\r\nFrom: {sender}\r\n"
        f"To: bok@desk.test\r\nSubject: Sprawa {n}\r\nMessage-ID: <m{n}@customer.test>\r\n"
        f"\r\nTreść {n}\r\n"
    ).encode()


@dataclass
class Folder:
    """What ImapIntake asks of a session, over a dict of UID -> message."""

    mail: dict[int, bytes]
    cut_after_fetches: int | None = None
    fetches: int = 0
    keywords: dict[int, set[str]] = field(default_factory=dict)
    moved: dict[int, str] = field(default_factory=dict)

    async def uids_above(self, last: int) -> list[int]:
        return sorted(u for u in self.mail if u > last)

    async def sizes(self, uids: list[int]) -> dict[int, int]:
        return {u: len(self.mail[u]) for u in uids if u in self.mail}

    async def bodies(self, uids: list[int], size: int = 0) -> list[tuple[int, bytes]]:
        if self.cut_after_fetches is not None and self.fetches >= self.cut_after_fetches:
            raise ImapDisconnected("UID FETCH BODY: connection lost")
        self.fetches += 1
        return [(u, self.mail[u]) for u in uids if u in self.mail]

    async def add_keywords_many(self, groups: list[tuple[list[int], tuple[str, ...]]]) -> None:
        for uids, words in groups:
            for uid in uids:
                if uid in self.mail:
                    self.keywords.setdefault(uid, set()).update(words)

    async def move(self, uids: list[int], folder: str) -> None:
        for uid in uids:
            if self.mail.pop(uid, None) is not None:
                self.moved[uid] = folder


def intake(h: Harness, batch_size: int) -> ImapIntake:
    imap = h.config.imap.model_copy(update={"batch_size": batch_size})
    config = h.config.model_copy(update={"imap": imap})
    return ImapIntake(config, h.daemon.committer, h.db, h.clock, h.daemon.log, h.daemon.metrics)


async def stored(h: Harness) -> int:
    async with h.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


async def test_a_cut_mid_backlog_and_a_restart_take_every_message_once(desk: Harness) -> None:
    senders = ["owner@acme.test", "stranger@unknown.test"]
    folder = Folder({uid: raw(uid, senders[uid % 2]) for uid in range(1, 8)}, cut_after_fetches=1)
    first = intake(desk, batch_size=3)
    assert await first._position(validity=5) == 0
    try:
        await first._take_new(folder, 5, 0)  # type: ignore[arg-type]
    except ImapDisconnected:
        pass
    else:
        raise AssertionError("the cut did not happen")
    assert await stored(desk) == 3  # the first batch, committed with its last UID
    assert await mailbox.load(desk.db, first.key) == (5, 3)
    await first._file_ready(folder, 5)  # type: ignore[arg-type]
    assert folder.moved == {}  # no verdict yet: nothing moves

    folder.cut_after_fetches = None  # reconnected (or restarted): a new intake
    second = intake(desk, batch_size=3)
    last = await second._position(validity=5)
    assert last == 3
    assert await second._take_new(folder, 5, last) == 7  # type: ignore[arg-type]
    assert await stored(desk) == 7
    await desk.daemon.drain()
    await second._file_ready(folder, 5)  # type: ignore[arg-type]
    assert sorted(folder.moved) == list(range(1, 8))
    for uid, target in folder.moved.items():
        assert target == ("Pending" if uid % 2 == 0 else "Unauthorized")
        assert len(folder.keywords[uid]) == 1 and next(iter(folder.keywords[uid])).startswith("IQ-")
    assert await mailbox.waiting(desk.db, second.key, 5) == 0


async def test_a_message_already_moved_when_filing_is_repeated_is_let_go(desk: Harness) -> None:
    folder = Folder({1: raw(1, "owner@acme.test")})
    watcher = intake(desk, batch_size=10)
    await watcher._position(validity=9)
    await watcher._take_new(folder, 9, 0)  # type: ignore[arg-type]
    await desk.daemon.drain()
    folder.mail.clear()  # moved by the last run, which died before it recorded it
    await watcher._file_ready(folder, 9)  # type: ignore[arg-type]
    assert await mailbox.waiting(desk.db, watcher.key, 9) == 0
