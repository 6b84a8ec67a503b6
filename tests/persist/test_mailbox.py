"""IMAP mode's state commits with the messages it covers, on both back ends."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from iqmaild.persist import mailbox
from iqmaild.persist.store import Incoming
from iqmaild.storage.models import Message
from tests.harness import Harness

KEY = "desk@imap.test:993/INBOX"


def mail(n: int, sender: str = "owner@acme.test") -> Incoming:
    raw = (
        f"Return-Path: <{sender}>\r\nFrom: {sender}\r\nTo: bok@desk.test\r\n"
        f"Subject: Sprawa {n}\r\nMessage-ID: <imap-{n}@customer.test>\r\n\r\nTreść {n}\r\n"
    ).encode()
    return Incoming(raw=raw, mail_from=sender, rcpt_to=["bok@desk.test"], channel="imap")


async def messages(h: Harness) -> int:
    async with h.db.read() as session:
        return int(await session.scalar(select(func.count()).select_from(Message)) or 0)


async def store(h: Harness, validity: int, uids: list[int], items: list[Incoming]) -> Any:
    record = mailbox.recorder(h.db, KEY, validity, uids, max(uids), h.clock.now())
    return await h.daemon.committer.store_batch(items, record)


async def test_a_batch_commits_with_the_last_uid_and_is_filed_after_its_verdict(
    desk: Harness,
) -> None:
    await mailbox.start_over(desk.db, KEY, 7, desk.clock.now())
    assert await mailbox.load(desk.db, KEY) == (7, 0)
    stored = await store(desk, 7, [3, 4], [mail(1), mail(2, "stranger@unknown.test")])
    assert [s.duplicate for s in stored] == [False, False]
    assert await mailbox.load(desk.db, KEY) == (7, 4)
    assert await mailbox.waiting(desk.db, KEY, 7) == 2
    assert await mailbox.ready(desk.db, KEY, 7, 10) == []  # no verdict yet: not moved
    await desk.daemon.drain()
    ready = await mailbox.ready(desk.db, KEY, 7, 10)
    assert [(r.uid, r.decision) for r in ready] == [(3, "pending"), (4, "unauthorized")]
    assert all(r.ticket_number for r in ready)
    await mailbox.filed(desk.db, KEY, 7, [3, 4])
    assert await mailbox.waiting(desk.db, KEY, 7) == 0
    # An older batch committed late never moves the position back.
    await store(desk, 7, [2], [mail(3)])
    assert await mailbox.load(desk.db, KEY) == (7, 4)


async def test_a_refetch_after_a_new_uidvalidity_is_stored_once_and_filed(desk: Harness) -> None:
    await mailbox.start_over(desk.db, KEY, 7, desk.clock.now())
    first = await store(desk, 7, [1], [mail(1)])
    await desk.daemon.drain()
    await mailbox.start_over(desk.db, KEY, 8, desk.clock.now())  # the folder was made again
    assert await mailbox.waiting(desk.db, KEY, 7) == 0
    again = await store(desk, 8, [1], [mail(1)])
    assert again[0].duplicate and again[0].id == first[0].id
    assert await messages(desk) == 1
    ready = await mailbox.ready(desk.db, KEY, 8, 10)
    assert [(r.uid, r.message, r.decision) for r in ready] == [(1, first[0].id, "pending")]


async def test_nothing_commits_when_the_batch_cannot(desk: Harness) -> None:
    await mailbox.start_over(desk.db, KEY, 7, desk.clock.now())

    async def fails(session: Any, stored: Any) -> None:
        raise RuntimeError("the state write failed")

    with pytest.raises(RuntimeError):
        await desk.daemon.committer.store_batch([mail(1), mail(2)], fails)
    assert await messages(desk) == 0
    assert await mailbox.load(desk.db, KEY) == (7, 0)
