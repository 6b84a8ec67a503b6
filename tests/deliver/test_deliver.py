"""The outbox sender against a real SMTP relay (DESIGN.md: "Outbound mail and loop protection").

4xx and connection errors are retried, 5xx recorded as failed, rows a crash left
in ``sending`` are re-queued and sent once, one connection carries many mails,
automatic mail is marked and rate-limited, and the link leaves no copy behind.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import select, update

from iqmaild import logs
from iqmaild.deliver.capture import CaptureRelay
from iqmaild.service import Daemon
from iqmaild.storage.models import AuthToken, Message, OutboxItem, Suppression
from tests.conftest import Sabotage, harness_on
from tests.harness import STAFF, Harness, start_harness, stop_harness

OWNER = "owner@acme.test"


async def outbox(h: Harness) -> list[OutboxItem]:
    async with h.db.read() as session:
        return list(await session.scalars(select(OutboxItem).order_by(OutboxItem.id)))


async def metrics_text(h: Harness) -> str:
    async with h.http.get(h.base_url + "/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def by_kind(rows: list[OutboxItem]) -> dict[str, OutboxItem]:
    out = {r.kind: r for r in rows}
    assert len(out) == len(rows), [r.kind for r in rows]
    return out


async def wait_until_due(h: Harness) -> None:
    """Move the clock past the latest next_attempt_at of queued rows (no sleeping)."""
    rows = [r for r in await outbox(h) if r.state == "queued"]
    if rows:
        due = max(r.next_attempt_at for r in rows)
        h.advance(max((due - h.clock.now()).total_seconds(), 0) + 0.01)


class CountingRelay(CaptureRelay):
    """The capture relay, also counting the SMTP connections it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.sessions: list[Session] = []
        self.servers: list[SMTP] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not any(s is session for s in self.sessions):
            self.sessions.append(session)
            self.servers.append(server)
        return await super().handle_DATA(server, session, envelope)


async def swap_relay(h: Harness, relay: CaptureRelay) -> None:
    """Put another relay on the configured relay port."""
    port = h.relay.port
    await h.relay.stop()
    await relay.start(port=port)
    h.relay = relay


@pytest.fixture
async def logged(tmp_path: Path) -> AsyncIterator[tuple[Harness, io.StringIO]]:
    """A desk whose JSON log lines (info and up) are kept for the test to read."""
    stream = io.StringIO()
    logs.configure("info", stream=stream)
    try:
        h = await start_harness(tmp_path)
        try:
            yield h, stream
        finally:
            await stop_harness(h)
    finally:
        logs.configure("warning")


def events(stream: io.StringIO, *names: str) -> list[dict[str, Any]]:
    out = []
    for line in stream.getvalue().splitlines():
        record = json.loads(line)
        if record.get("event") in names:
            out.append(record)
    return out


# -- retries and failures ---------------------------------------------------


@pytest.mark.parametrize(
    ("stage", "reply"),
    [("data", "451 4.3.0 Try again later"), ("rcpt", "450 4.2.1 Mailbox busy")],
)
async def test_a_4xx_is_deferred_and_delivered_on_retry(
    logged: tuple[Harness, io.StringIO], stage: str, reply: str
) -> None:
    desk, stream = logged
    getattr(desk.relay, f"{stage}_replies").append(reply)
    await desk.send()
    await desk.drain()

    rows = await outbox(desk)
    deferred = [r for r in rows if r.state == "queued"]
    assert len(deferred) == 1 and [r.state for r in rows].count("sent") == 1
    row = deferred[0]
    assert row.attempts == 1
    assert reply[:3] in (row.last_error or "")
    assert row.next_attempt_at > row.created_at
    assert len(desk.relay.messages) == 1

    await wait_until_due(desk)
    await desk.drain()
    async with desk.db.read() as session:
        done = await session.get(OutboxItem, row.id)
    assert done is not None
    assert (done.state, done.attempts, done.last_error) == ("sent", 2, None)
    assert done.sent_at is not None
    assert sorted(m.rcpt_tos[0] for m in desk.relay.messages) == sorted([OWNER, STAFF])

    history = [
        e["event"]
        for e in events(stream, "outbox.deferred", "outbox.sent", "outbox.failed")
        if e["outbox"] == row.id
    ]
    assert history == ["outbox.deferred", "outbox.sent"]
    assert f'iqmaild_outbox_deferred_total{{kind="{row.kind}"}} 1.0' in await metrics_text(desk)


@pytest.mark.parametrize(
    ("stage", "reply"),
    [("data", "550 5.7.1 Message refused"), ("rcpt", "550 5.1.1 No such user")],
)
async def test_a_5xx_is_recorded_as_failed_and_never_retried(
    logged: tuple[Harness, io.StringIO], stage: str, reply: str
) -> None:
    desk, stream = logged
    getattr(desk.relay, f"{stage}_replies").append(reply)
    await desk.send()
    await desk.drain()

    rows = await outbox(desk)
    assert sorted(r.state for r in rows) == ["failed", "sent"]
    failed = next(r for r in rows if r.state == "failed")
    assert failed.attempts == 1
    assert reply[:3] in (failed.last_error or "")

    desk.advance(0.3)  # longer than retry_max_seconds
    await desk.drain()
    async with desk.db.read() as session:
        again = await session.get(OutboxItem, failed.id)
    assert again is not None and (again.state, again.attempts) == ("failed", 1)
    assert len(desk.relay.messages) == 1
    assert [e["outbox"] for e in events(stream, "outbox.failed")] == [failed.id]


async def test_relay_down_keeps_rows_queued_until_it_is_back(tmp_path: Path) -> None:
    desk = await start_harness(
        tmp_path, outbound={"retry_base_seconds": 0.5, "retry_max_seconds": 1.0}
    )
    try:
        port = desk.relay.port
        await desk.relay.stop()
        await desk.send()
        started = desk.clock.now()
        await desk.drain()
        rows = await outbox(desk)
        assert len(rows) == 2
        for row in rows:
            assert (row.state, row.attempts) == ("queued", 1)
            assert row.next_attempt_at > started + timedelta(seconds=0.3)
            assert "relay" in (row.last_error or "")

        # Not due yet: another drain does not touch them.
        await desk.drain()
        assert [(r.state, r.attempts) for r in await outbox(desk)] == [("queued", 1)] * 2

        await desk.relay.start(port=port)
        await wait_until_due(desk)
        await desk.drain()
        rows = await outbox(desk)
        assert [(r.state, r.attempts) for r in rows] == [("sent", 2)] * 2
        assert sorted(m.rcpt_tos[0] for m in desk.relay.messages) == sorted([OWNER, STAFF])
    finally:
        await stop_harness(desk)


async def test_rows_left_sending_by_a_crash_are_requeued_and_sent_once(desk: Harness) -> None:
    await desk.send()
    await desk.daemon.classifier.drain()
    rows = await outbox(desk)
    assert [r.state for r in rows] == ["queued", "queued"]
    # The crash: both rows were claimed, the first one also reached the relay
    # and was marked sent, the second one was in flight.
    first, second = rows
    async with desk.db.transaction() as session:
        await session.execute(
            update(OutboxItem).where(OutboxItem.id == first.id).values(state="sent", attempts=1)
        )
        await session.execute(
            update(OutboxItem)
            .where(OutboxItem.id == second.id)
            .values(
                state="sending",
                attempts=1,
                claimed_by="crashed:1:aa",
                claimed_until=desk.clock.now() + timedelta(minutes=10),
            )
        )

    await desk.drain()  # a row under a live lease is nobody else's to send
    assert desk.relay.messages == []
    assert await desk.daemon.outbox.recover() == 0

    desk.advance(11 * 60)  # the crashed instance's lease runs out
    assert await desk.daemon.outbox.recover() == 1
    await desk.drain()
    await desk.drain()
    assert [m.rcpt_tos for m in desk.relay.messages] == [[second.recipient]]
    after = {r.id: r for r in await outbox(desk)}
    assert (after[second.id].state, after[second.id].attempts) == ("sent", 2)
    assert after[first.id].state == "sent"
    assert await desk.daemon.outbox.recover() == 0


async def test_a_restart_requeues_sending_rows(desk: Harness) -> None:
    await desk.send()
    await desk.daemon.classifier.drain()
    async with desk.db.transaction() as session:
        await session.execute(update(OutboxItem).values(state="sending", attempts=1))
    await desk.daemon.stop()
    desk.daemon = Daemon(desk.config, clock=desk.clock, workers=0)
    await desk.daemon.start(background=False)  # SQLite: the instance lock says nobody else runs
    await desk.drain()
    await desk.drain()
    assert sorted(m.rcpt_tos[0] for m in desk.relay.messages) == sorted([OWNER, STAFF])
    assert [r.state for r in await outbox(desk)] == ["sent", "sent"]


# -- connections --------------------------------------------------------------


async def test_drains_reuse_the_relay_connections(desk: Harness) -> None:
    relay = CountingRelay()
    await swap_relay(desk, relay)
    for round_ in range(2):
        for i in range(3):
            await desk.send(subject=f"Zgłoszenie {round_}.{i}")
        await desk.drain()
    assert len(relay.messages) == 12  # six links, six staff copies
    assert len(relay.sessions) == desk.config.outbound.connections  # side by side, reused


@pytest.fixture
async def one_connection(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness_on(backend, tmp_path, outbound={"connections": 1}) as h:
        yield h


async def test_a_connection_closed_by_the_relay_is_replaced(one_connection: Harness) -> None:
    desk = one_connection
    relay = CountingRelay()
    await swap_relay(desk, relay)
    await desk.send(subject="Pierwsze")
    await desk.drain()
    assert len(relay.sessions) == 1
    # The relay drops the idle connection (Postfix does after smtpd_timeout).
    for server in relay.servers:
        assert server.transport is not None
        server.transport.close()
    await asyncio.sleep(0.05)
    await desk.send(subject="Drugie")
    await desk.drain()
    rows = await outbox(desk)
    assert [r.state for r in rows] == ["sent"] * 4
    assert [r.attempts for r in rows] == [1] * 4
    assert len(relay.messages) == 4
    assert len(relay.sessions) == 2


# -- automatic mail -----------------------------------------------------------


async def test_automatic_mail_is_marked_as_such(desk: Harness) -> None:
    await desk.send()
    await desk.send(sender="stranger@unknown.test", subject="Kim jestem?")
    await desk.drain()
    mails = desk.new_mail()
    automatic = [m for m in mails if m.envelope_to[0] != STAFF]
    assert sorted(m.envelope_to[0] for m in automatic) == sorted([OWNER, "stranger@unknown.test"])
    for mail in automatic:
        assert mail.get_all("Auto-Submitted") == ["auto-replied"]
        assert mail.get_all("X-Auto-Response-Suppress") == ["All"]
    # Staff copies are the customer's mail, not an auto-reply.
    for mail in mails:
        if mail.envelope_to[0] == STAFF:
            assert mail["Auto-Submitted"] is None


async def test_authorization_mail_is_rate_limited_per_recipient(tmp_path: Path) -> None:
    limits = {"per_recipient_10min": 2, "per_recipient_day": 20, "per_ticket_day": 10}
    desk = await start_harness(tmp_path, outbound={"rate_limit": limits})
    try:
        for i in range(4):  # e.g. someone forging the owner's From
            await desk.send(subject=f"Zgłoszenie {i}")
        await desk.drain()
        mails = desk.new_mail()
        to_owner = [m for m in mails if m.envelope_to == [OWNER]]
        to_staff = [m for m in mails if m.envelope_to == [STAFF]]
        assert len(to_owner) == 2
        assert len(to_staff) == 4
        assert sorted(m["X-IQ-Ticket"] for m in to_staff) == ["1000", "1001", "1002", "1003"]
        kinds = [r.kind for r in await outbox(desk)]
        assert kinds.count("auth_request") == 2
        assert 'iqmaild_autoreplies_suppressed_total{why="recipient_rate_limit"} 2.0' in (
            await metrics_text(desk)
        )
    finally:
        await stop_harness(desk)


async def test_automatic_mail_is_rate_limited_per_ticket(tmp_path: Path) -> None:
    """A ticket answered again and again (a responder, a forger with its number) gets
    at most ``per_ticket_day`` automatic mails; staff see each one held back."""
    limits = {"per_recipient_10min": 100, "per_recipient_day": 100, "per_ticket_day": 3}
    desk = await start_harness(tmp_path, outbound={"rate_limit": limits})
    try:
        number = await desk.authorized_ticket()  # the link and the acknowledgement: 2
        wrong = f"[IQ.pl#{number}:0000000000000000dead]"
        for i in range(4):  # each a code_mismatch notice to the owner
            await desk.send(subject=f"Re: {wrong} próba {i}")
        await desk.drain()
        mails = desk.new_mail()
        notices = [m for m in mails if m.envelope_to == [OWNER]]
        staff = [m for m in mails if m.envelope_to == [STAFF]]
        assert len(notices) == 1 and len(staff) == 4
        held = [m for m in staff if "ticket_rate_limit" in str(m["X-IQ-Suppressed"])]
        assert len(held) == 3
        assert 'iqmaild_autoreplies_suppressed_total{why="ticket_rate_limit"} 3' in (
            await metrics_text(desk)
        )
    finally:
        await stop_harness(desk)


async def test_sent_mail_is_blanked_from_the_outbox(desk: Harness) -> None:
    """Links, codes and customers' messages stay only where they went, not in our rows."""
    await desk.send()
    await desk.daemon.classifier.drain()
    queued = by_kind(await outbox(desk))
    assert b"/authorize/" in queued["auth_request"].content
    await desk.daemon.outbox.drain()
    sent = by_kind(await outbox(desk))
    assert sent["auth_request"].state == sent["staff"].state == "sent"
    assert sent["auth_request"].content == sent["staff"].content == b""
    assert any(b"/authorize/" in m.content for m in desk.relay.messages)


async def test_a_utf8_recipient_does_not_stop_the_outbox(tmp_path: Path) -> None:
    staff = "obsługa@desk.test"
    desk = await start_harness(tmp_path, outbound={"staff_address": staff})
    try:
        await desk.send()
        await desk.drain()
        rows = await outbox(desk)
        assert [r.state for r in rows] == ["sent", "sent"]
        assert sorted(m.rcpt_tos[0] for m in desk.relay.messages) == sorted([OWNER, staff])
    finally:
        await stop_harness(desk)


async def test_only_expired_leases_are_taken_back_from_other_instances(desk: Harness) -> None:
    """Several instances on PostgreSQL: a live claim is never re-sent by a peer."""
    await desk.send()
    await desk.daemon.classifier.drain()
    live, dead = await outbox(desk)
    async with desk.db.transaction() as session:
        for row, until in ((live, timedelta(minutes=10)), (dead, timedelta(minutes=-1))):
            await session.execute(
                update(OutboxItem)
                .where(OutboxItem.id == row.id)
                .values(
                    state="sending", claimed_by="peer:1:aa", claimed_until=desk.clock.now() + until
                )
            )
    assert await desk.daemon.outbox.recover(all_claims=False) == 1
    await desk.drain()
    assert [m.rcpt_tos for m in desk.relay.messages] == [[dead.recipient]]
    assert {r.id: r.state for r in await outbox(desk)} == {live.id: "sending", dead.id: "sent"}


async def test_notices_to_unknown_senders_are_capped_per_domain(tmp_path: Path) -> None:
    """Forged spam: victim+1@, victim+2@... must not turn the desk into a backscatter source."""
    h = await start_harness(
        tmp_path,
        outbound={
            "rate_limit": {
                "per_recipient_10min": 5,
                "per_recipient_day": 20,
                "per_ticket_day": 10,
                "unknown_sender_domain_hour": 2,
            }
        },
    )
    try:
        for n in range(1, 5):
            await h.send(sender=f"victim+{n}@spam.test", subject=f"Spam {n}")
        await h.drain()
        notices = [m for m in h.new_mail() if m.envelope_to != [STAFF]]
        assert [m.envelope_to for m in notices] == [["victim+1@spam.test"], ["victim+2@spam.test"]]
        async with h.db.read() as session:
            decisions = list(await session.scalars(select(Message.decision)))
        assert decisions == ["unauthorized"] * 4  # every message still stored and staff-delivered
        # A customer's own primary address is not an unknown sender: not capped by this.
        await h.send(sender=OWNER)
        await h.drain()
        assert [OWNER] in [m.envelope_to for m in h.new_mail()]
    finally:
        await stop_harness(h)


async def test_a_graceful_stop_hands_back_claimed_rows(desk: Harness) -> None:
    await desk.send()
    await desk.daemon.classifier.drain()
    claimed = await desk.daemon.outbox._claim()  # claimed, then the daemon is told to stop
    assert len(claimed) == 2
    await desk.daemon.stop()
    # Read what the stop left, before any start-up recovery could tidy it.
    rows = Sabotage(desk.config.database.url).rows("SELECT state, claimed_by FROM outbox")
    assert {(state, by or None) for state, by in rows} == {("queued", None)}
    desk.daemon = Daemon(desk.config, clock=desk.clock, workers=0)  # the harness stops it
    await desk.daemon.start(background=False)


# -- failure modes that once duplicated or lost mail (issue 5, item 10) -------


async def test_a_relay_refusing_us_at_mail_is_retried_not_failed(desk: Harness) -> None:
    """Three seconds of 554 from a misconfigured relay must not fail links and staff copies."""
    desk.relay.mail_replies.extend(["554 5.7.1 Relay access denied"] * 4)
    await desk.send()
    await desk.drain()
    assert {r.state for r in await outbox(desk)} == {"queued"}
    while desk.relay.mail_replies:
        await wait_until_due(desk)
        await desk.drain()
    await wait_until_due(desk)
    await desk.drain()
    assert {r.state for r in await outbox(desk)} == {"sent"}
    assert sorted(m.rcpt_tos[0] for m in desk.relay.messages) == sorted([OWNER, STAFF])


async def test_a_refused_recipient_fails_the_mail_and_suppresses_the_address(
    desk: Harness,
) -> None:
    desk.relay.rcpt_replies.append("550 5.1.1 <owner@acme.test>: no such user")
    await desk.send()
    await desk.drain()
    rows = by_kind(await outbox(desk))
    assert (rows["auth_request"].state, rows["auth_request"].content) == ("failed", b"")
    async with desk.db.read() as session:
        suppression = await session.get(Suppression, OWNER)
        tokens = list(await session.scalars(select(AuthToken)))
    assert suppression is not None and "5.1.1" in suppression.reason
    assert [t.used_at is not None for t in tokens] == [True]  # a link that cannot arrive is spent


async def test_a_staff_copy_refused_for_good_is_retried_until_an_operator_acts(
    logged: tuple[Harness, io.StringIO],
) -> None:
    desk, stream = logged
    desk.relay.rcpt_replies.extend(["250", "550 5.1.1 staff mailbox is gone"])
    await desk.send()
    await desk.drain()
    staff = by_kind(await outbox(desk))["staff"]
    assert staff.state == "queued" and "550" in (staff.last_error or "")
    assert [e["outbox"] for e in events(stream, "outbox.staff_refused")] == [staff.id]
    async with desk.db.transaction() as session:  # ten days of it: still never given up
        await session.execute(
            update(OutboxItem).values(created_at=desk.clock.now() - timedelta(days=10))
        )
    await wait_until_due(desk)
    await desk.drain()
    assert by_kind(await outbox(desk))["staff"].state == "sent"


async def test_a_staff_copy_too_large_for_the_relay_reaches_staff_as_a_summary(
    desk: Harness,
) -> None:
    desk.relay.data_replies.extend(["250", "552 5.3.4 Message size exceeds fixed limit"])
    attachment = "A" * 200_000
    await desk.send(body=f"Załącznik:\n{attachment}\n")
    await desk.drain()  # refused: replaced by a summary and queued at once
    await desk.drain()
    row = await desk.last_message()
    [summary] = [m for m in desk.new_mail() if m.envelope_to == [STAFF]]
    assert summary["X-IQ-Message"] == str(row.id) and summary["X-IQ-Authorization"] == "pending"
    assert summary["X-IQ-Summary"] and summary["Subject"] == "Problem z pocztą"
    text = summary.get_content()
    assert f"iqmaild message show {row.id} --raw" in text
    assert len(summary.as_bytes()) < 30_000


async def test_the_end_of_data_may_take_longer_than_a_command(tmp_path: Path) -> None:
    """RFC 5321 §4.5.3.2: the reply to the end of DATA deserves minutes; a short timeout
    there made a slow relay deliver the same mail again and again."""
    desk = await start_harness(tmp_path, outbound={"connect_timeout": 0.3, "data_timeout": 10})
    try:
        desk.relay.data_delay = 1.0
        await desk.send()
        await desk.drain()
        assert {r.state for r in await outbox(desk)} == {"sent"}
        assert len(desk.relay.messages) == 2  # each exactly once
    finally:
        await stop_harness(desk)


async def test_a_failure_marking_a_row_sent_never_sends_it_again(
    one_connection: Harness,
) -> None:
    """The relay accepted; the 'sent' mark fails: the row is not sent a second time."""
    desk = one_connection
    faults = Sabotage(desk.config.database.url)
    broken = False

    def sabotage(_item: Any, _path: Any) -> None:
        nonlocal broken
        if not broken:  # after the relay took the first mail, the database refuses writes
            broken = True
            faults.rename("outbox", "outbox_away")

    desk.relay.on_message = sabotage
    await desk.send()
    await desk.daemon.classifier.drain()
    await desk.daemon.outbox.drain()  # the mark fails: nothing more is claimed meanwhile
    await desk.daemon.outbox.drain()
    sent_while_failing = [m.rcpt_tos[0] for m in desk.relay.messages]
    # marks are pipelined: a send already under way may finish, none is repeated
    assert len(sent_while_failing) == len(set(sent_while_failing)) >= 1
    assert {r[0] for r in faults.rows("SELECT state FROM outbox_away")} == {"sending"}
    faults.rename("outbox_away", "outbox")
    await desk.daemon.outbox.drain()  # the marks first, before anything is claimed
    await desk.daemon.outbox.drain()
    assert {r.state for r in await outbox(desk)} == {"sent"}
    recipients = sorted(m.rcpt_tos[0] for m in desk.relay.messages)
    assert recipients == sorted([OWNER, STAFF])  # each once


async def test_customer_mail_gives_up_by_age_and_a_failed_link_can_be_reissued(
    desk: Harness,
) -> None:
    await desk.relay.stop()  # the relay is down for days
    await desk.send()
    await desk.daemon.classifier.drain()
    async with desk.db.transaction() as session:
        await session.execute(
            update(OutboxItem).values(created_at=desk.clock.now() - timedelta(days=6))
        )
    await desk.daemon.outbox.drain()
    rows = by_kind(await outbox(desk))
    assert (rows["auth_request"].state, rows["staff"].state) == ("failed", "queued")
    assert rows["auth_request"].content == b""  # and its link spent
    from iqmaild.cli.tickets import reissue_link

    await reissue_link(desk.config, desk.db, 1000)
    async with desk.db.read() as session:
        tokens = list(await session.scalars(select(AuthToken).order_by(AuthToken.id)))
    assert [t.used_at is None for t in tokens] == [False, True]
    queued = [r for r in await outbox(desk) if r.state == "queued" and r.kind == "auth_request"]
    assert len(queued) == 1
