"""Retention (issue 8, item 1): the seed's periods against an injected clock, both back ends.

The story of one desk over six years: a ticket whose communication ended is
purged after three months (number and tag kept, nothing personal), one still in
correspondence is not; a late follow-up to the purged one opens a new ticket;
security events go after two years, the claims record after six.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from iqmaild.clock import FakeClock
from iqmaild.config import parse_config
from iqmaild.core.policy import PURGED_TICKET
from iqmaild.core.retention import PERSONAL_KEYS, SECURITY_EVENTS
from iqmaild.lifecycle.retention import KINDS
from iqmaild.service import Daemon
from iqmaild.storage import schema
from iqmaild.storage.db import Database
from iqmaild.storage.directory import import_directory
from iqmaild.storage.models import AuditEvent, AuthToken, Message, OutboxItem, Ticket
from tests.conftest import harness_on
from tests.harness import DIRECTORY, Harness, config_dict
from tests.pg import temp_database

DAY = 86400.0


@pytest.fixture
async def desk(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """Small batches: a run takes several transactions per kind."""
    async with harness_on(backend, tmp_path, retention={"batch_size": 2}) as h:
        yield h


async def _rows(h: Harness, model: Any, *where: Any) -> list[Any]:
    async with h.db.read() as session:
        return list(await session.scalars(select(model).where(*where)))


async def _ticket_rows(h: Harness, number: int) -> tuple[Ticket, list[Message], list[OutboxItem]]:
    ticket = await h.ticket(number)
    messages = await _rows(h, Message, Message.ticket_id == ticket.id)
    outbox = await _rows(h, OutboxItem, OutboxItem.ticket_id == ticket.id)
    return ticket, messages, outbox


async def test_purge_keeps_claims_record_and_a_late_follow_up_opens_a_new_ticket(
    desk: Harness,
) -> None:
    h = desk
    old = await h.authorized_ticket("Faktura za marzec")
    old_tag = await h.tag(old)
    await h.send(subject=f"Re: {old_tag} jeszcze jedno", cc=["dev@partner.test"])
    await h.drain()
    before_ticket, before_messages, before_outbox = await _ticket_rows(h, old)
    raw_hashes = {m.id: m.raw_sha256 for m in before_messages}
    sent_hashes = {o.id: o.content_sha256 for o in before_outbox}
    assert all(sent_hashes.values())
    assert before_outbox and all(o.state == "sent" for o in before_outbox)

    h.advance(60 * DAY)
    recent = await h.authorized_ticket("Serwer WWW")  # still in correspondence later
    h.advance(35 * DAY)  # the old one ended 95 days ago, the recent one 35 days ago

    due = await h.daemon.retention.due()
    assert due["tickets"] == 1
    assert due["messages"] == len(before_messages)
    assert due["outbox"] == len(before_outbox)
    assert due["auth_tokens"] >= 1
    assert due["audit_events"] >= len(before_messages)
    assert due["security_events"] == due["expired_tickets"] == 0
    assert (await h.ticket(old)).purged_at is None  # a dry run changes nothing

    done = await h.daemon.retention.run(actor="test")
    assert done == due
    assert set(done) == set(KINDS)

    ticket, messages, outbox = await _ticket_rows(h, old)
    assert ticket.number == old and ticket.code_nonce == before_ticket.code_nonce  # the tag
    assert ticket.purged_at is not None and ticket.created_at == before_ticket.created_at
    assert ticket.authorization == "authorized"
    assert (ticket.requester, ticket.subject, ticket.account_id) == (None, "", None)
    assert {m.id for m in messages} == set(raw_hashes)
    for m in messages:
        assert m.raw == b"" and m.subject == "" and m.from_address is None
        assert m.rcpt_to == [] and m.headers == {} and m.mail_from == ""
        assert m.raw_sha256 == raw_hashes[m.id] and m.decision and m.received_at
        assert m.message_id == f"purged:{m.id}"
    for o in outbox:
        assert o.content == b"" and o.recipient == "" and o.kind and o.sent_at
        assert o.content_sha256 == sent_hashes[o.id] and o.purged_at
    tokens = await _rows(h, AuthToken, AuthToken.ticket_id == ticket.id)
    assert tokens and all(t.email == "" for t in tokens)
    audits = await _rows(h, AuditEvent, AuditEvent.ticket_id == ticket.id)
    assert audits and all(a.purged_at is not None for a in audits)
    assert not any(PERSONAL_KEYS & set(a.data) for a in audits)
    assert any(a.event == "authlink.confirmed" for a in audits)  # the event stays
    run = await _rows(h, AuditEvent, AuditEvent.event == "retention.run")
    assert len(run) == 1 and run[0].actor == "test" and run[0].data["tickets"] == 1

    kept, kept_messages, _ = await _ticket_rows(h, recent)
    assert kept.purged_at is None and kept.requester == "owner@acme.test"
    assert all(m.raw for m in kept_messages)
    assert set((await h.daemon.retention.due()).values()) == {0}  # a second run: nothing

    # A late follow-up with the purged ticket's full tag: a new ticket, pending.
    await h.send(subject=f"Re: {old_tag} wracam do sprawy")
    await h.drain()
    latest = await h.last_message()
    assert PURGED_TICKET in latest.rules_hit and latest.decision == "pending"
    async with h.db.read() as session:
        fresh = await session.get(Ticket, latest.ticket_id)
    assert fresh is not None and fresh.number not in (old, recent)
    assert fresh.subject == "wracam do sprawy" and fresh.requester == "owner@acme.test"
    assert [m.envelope_to for m in h.new_mail() if m.envelope_to != ["staff@desk.test"]] == [
        ["owner@acme.test"]
    ]  # the link for the new ticket, nothing about the old one
    assert len((await _ticket_rows(h, old))[1]) == len(before_messages)


async def test_security_events_after_two_years_claims_records_after_six(desk: Harness) -> None:
    h = desk
    number = await h.authorized_ticket()
    await h.send(sender="stranger@nowhere.test", subject="Hello")  # refused mail
    await h.drain()
    h.advance(100 * DAY)
    first = await h.daemon.retention.run()
    assert first["tickets"] == 2 and first["messages"] == 2  # the stranger has a ticket too

    h.advance(2 * 366 * DAY)
    second = await h.daemon.retention.run()
    assert second["security_events"] == 3 and second["security_auth_tokens"] >= 1
    assert second["expired_tickets"] == 0
    left = await _rows(h, AuditEvent)
    assert left and not any(a.event in SECURITY_EVENTS for a in left)
    assert any(a.event == "ticket.created" for a in left)  # the claims record
    assert (await h.ticket(number)).purged_at is not None

    h.advance(4 * 366 * DAY)
    third = await h.daemon.retention.run()
    assert third["expired_tickets"] == 2 and third["expired_messages"] == 2
    assert third["expired_outbox"] == 6 and third["expired_audit_events"] == 3
    async with h.db.read() as session:
        for model in (Ticket, Message, OutboxItem, AuthToken):
            assert await session.scalar(select(func.count()).select_from(model)) == 0
        events = list(await session.scalars(select(AuditEvent.event)))
    assert set(events) == {"retention.run"}  # only the runs' own record, counts only
    # Numbers are never reused, also after the records are gone.
    await h.send(subject="Nowa sprawa")
    await h.drain()
    async with h.db.read() as session:
        newest = await session.scalar(select(func.max(Ticket.number)))
    assert newest is not None and newest > number + 1


async def test_an_open_ticket_still_written_to_is_kept(desk: Harness) -> None:
    h = desk
    number = await h.authorized_ticket()
    for _ in range(4):
        h.advance(80 * DAY)
        await h.send(subject=f"Re: {await h.tag(number)} ciąg dalszy")
        await h.drain()
        assert (await h.daemon.retention.run())["tickets"] == 0
    h.advance(80 * DAY)
    assert (await h.daemon.retention.run())["tickets"] == 0  # 80 days since the last
    h.advance(15 * DAY)
    assert (await h.daemon.retention.run())["tickets"] == 1


@pytest.fixture
async def running(backend: str, tmp_path: Path) -> AsyncIterator[tuple[Daemon, FakeClock]]:
    """The daemon as `serve` starts it (background tasks on), in this loop, on a FakeClock."""

    async def start(url: str) -> tuple[Daemon, FakeClock]:
        db = Database(url)
        await schema.upgrade(db)
        async with db.transaction() as session:
            await import_directory(session, DIRECTORY, datetime.now(UTC))
        await db.dispose()
        config = parse_config(config_dict(url, 9))
        clock = FakeClock(datetime.now(UTC))
        daemon = Daemon(config, clock=clock, workers=0)
        await daemon.start(background=True)
        return daemon, clock

    if backend == "sqlite":
        daemon, clock = await start(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
        try:
            yield daemon, clock
        finally:
            await daemon.stop()
        return
    async with temp_database() as url:
        daemon, clock = await start(url)
        try:
            yield daemon, clock
        finally:
            await daemon.stop()


async def test_the_daemon_runs_retention_daily_by_itself(
    running: tuple[Daemon, FakeClock],
) -> None:
    import asyncio

    daemon, clock = running
    assert "retention" in {t.get_name() for t in daemon.tasks}
    async with daemon.db.transaction() as session:
        now = clock.now()
        session.add(
            AuditEvent(ts=now, event="authlink.confirmed", data={"email": "owner@acme.test"})
        )
    clock.advance(2 * 366 * DAY)
    for _ in range(400):  # liveness only: the task runs once it looks at the clock
        daemon.retention.wakeup.set()
        await asyncio.sleep(0.05)
        if daemon.retention.last_counts is not None:
            break
    assert daemon.retention.last_counts is not None
    assert daemon.retention.last_counts["security_events"] == 1
    assert not daemon.tasks[-1].done()


async def test_a_row_queued_before_hashes_gets_one_from_its_content(desk: Harness) -> None:
    """Rows from before migration 0004 carry no hash: purging takes it from what is left."""
    h = desk
    now = h.clock.now()
    content = b"Subject: x\r\n\r\nfailed mail to a stranger\r\n"
    async with h.db.transaction() as session:
        row = OutboxItem(
            kind="refusal",
            mail_from="bok@desk.test",
            recipient="stranger@nowhere.test",
            content=content,
            state="failed",
            next_attempt_at=now,
            created_at=now,
            last_error="550 no such user stranger@nowhere.test",
        )
        queued = OutboxItem(
            kind="refusal",
            mail_from="bok@desk.test",
            recipient="late@nowhere.test",
            content=content,
            state="queued",
            next_attempt_at=now,
            created_at=now,
        )
        session.add_all([row, queued])
    h.advance(100 * DAY)
    assert (await h.daemon.retention.run())["outbox"] == 1
    async with h.db.read() as session:
        purged = await session.get(OutboxItem, row.id)
        waiting = await session.get(OutboxItem, queued.id)
    assert purged is not None and waiting is not None
    assert purged.content_sha256 == hashlib.sha256(content).hexdigest()
    assert (purged.content, purged.recipient, purged.last_error) == (b"", "", None)
    assert waiting.content == content and waiting.purged_at is None  # still to be sent
