"""The queue tools (README, "Command line"), as an operator runs them.

The daemon runs as in production (the worker process, the system clock, no
drain()); the ``iqmaild`` command runs as a process of its own against the same
database, and what it changes must reach the capture relay by itself: the
daemon is never told, it notices.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from iqmaild.storage.models import AuthToken, OutboxItem, Ticket
from tests.conftest import harness_on
from tests.harness import STAFF, Harness, link_in, parse, to_toml

OWNER = "owner@acme.test"
LATER = "451 4.3.0 Try again later"
HANG = 20.0  # seconds: only a guard against a test that would wait forever


@pytest.fixture
async def live(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    # Retries an hour apart: a deferred row leaves only when an operator says so.
    retries = {"retry_base_seconds": 3600, "retry_max_seconds": 3600}
    async with harness_on(backend, tmp_path, background=True, outbound=retries) as h:
        path = tmp_path / "cli.toml"
        path.write_text(to_toml(h.config.model_dump(by_alias=True, mode="json")))
        h.extra["conf"] = path
        yield h


async def iq(h: Harness, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real command, in a process of its own (the daemon's loop goes on meanwhile)."""
    command = [sys.executable, "-m", "iqmaild.cli", "--config", str(h.extra["conf"]), *args]
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


async def rows(h: Harness, *args: str) -> list[dict[str, Any]]:
    return json.loads((await iq(h, "outbox", "list", "--json", *args)).stdout)


async def last_ticket(h: Harness) -> int:
    message = await h.last_message()
    async with h.db.read() as session:
        ticket = await session.get(Ticket, message.ticket_id)
        assert ticket is not None
        return ticket.number


async def arrival(h: Harness, count: int) -> None:
    start = time.monotonic()
    while len(h.relay.messages) < count:
        if time.monotonic() - start > HANG:
            got = [m.rcpt_tos for m in h.relay.messages]
            raise AssertionError(f"{count} mails not at the relay: {got}")
        await asyncio.sleep(0.02)


async def deferred(h: Harness, count: int) -> list[dict[str, Any]]:
    start = time.monotonic()
    while True:
        found = await rows(h, "--state", "deferred")
        if len(found) >= count:
            return found
        if time.monotonic() - start > HANG:
            raise AssertionError(f"not {count} deferred rows: {found}")
        await asyncio.sleep(0.1)


async def test_deferred_mail_is_listed_and_flush_sends_it_at_once(live: Harness) -> None:
    live.relay.rcpt_replies = [LATER, LATER]  # the link and the staff copy are deferred
    await live.send(subject="Kolejka")
    found = await deferred(live, 2)
    number = await last_ticket(live)
    assert {r["kind"] for r in found} == {"auth_request", "staff"}
    for row in found:
        assert (row["ticket"], row["attempts"], row["state"]) == (number, 1, "queued")
        assert row["deferred"]
        assert row["next_attempt"] not in ("", "now") and "451" in row["last_error"]
    table = (await iq(live, "outbox", "list", "--state", "deferred")).stdout
    assert "NEXT_ATTEMPT" in table and "LAST_ERROR" in table and str(number) in table
    assert live.relay.messages == []

    assert "2 deferred message(s) due now" in (await iq(live, "outbox", "flush")).stdout
    await arrival(live, 2)  # the daemon noticed by itself
    assert sorted(m.rcpt_tos[0] for m in live.relay.messages) == sorted([OWNER, STAFF])
    assert await rows(live, "--state", "deferred") == []
    sent = await rows(live, "--state", "sent")
    assert len(sent) == 2 and all(r["sent"] for r in sent)


async def test_hold_release_retry_and_delete(live: Harness) -> None:
    live.relay.rcpt_replies = [LATER, LATER]
    await live.send(subject="Wstrzymane")
    found = {r["kind"]: r["id"] for r in await deferred(live, 2)}
    link, staff = found["auth_request"], found["staff"]
    async with live.db.read() as session:
        content = await session.scalar(select(OutboxItem.content).where(OutboxItem.id == link))
    old_link = link_in(parse(content or b""))

    assert "1 message(s) held" in (await iq(live, "outbox", "hold", str(staff))).stdout
    [held] = await rows(live, "--state", "held")
    assert held["id"] == staff
    await iq(live, "outbox", "flush")
    await arrival(live, 1)
    assert [m.rcpt_tos for m in live.relay.messages] == [[OWNER]]  # the held one stays
    # what cannot be changed is said, with a non-zero exit
    wrong = await iq(live, "outbox", "hold", str(link), "999999", check=False)
    assert wrong.returncode == 1
    assert f"outbox {link}: is sent" in wrong.stderr and "999999: no such row" in wrong.stderr
    assert "1 message(s) released" in (await iq(live, "outbox", "release", str(staff))).stdout
    await arrival(live, 2)
    assert live.relay.messages[1].rcpt_tos == [STAFF]

    # A follow-up's mail deferred again: retry one by id, delete the other.
    live.relay.rcpt_replies = [LATER, LATER]
    await live.send(subject="Drugi raz")
    again = {r["kind"]: r["id"] for r in await deferred(live, 2)}
    assert "1 message(s) queued" in (await iq(live, "outbox", "retry", str(again["staff"]))).stdout
    await arrival(live, 3)
    assert live.relay.messages[2].rcpt_tos == [STAFF]
    new_link = again["auth_request"]
    assert "1 message(s) deleted" in (await iq(live, "outbox", "delete", str(new_link))).stdout
    [gone] = [r for r in await rows(live, "--state", "deleted") if r["id"] == new_link]
    assert gone["last_error"] == "deleted by an operator"
    await iq(live, "outbox", "flush")
    async with live.db.read() as session:
        token = await session.scalar(select(AuthToken).where(AuthToken.outbox_id == new_link))
        blank = await session.scalar(select(OutboxItem.content).where(OutboxItem.id == new_link))
    assert token is not None and token.used_at is not None and blank == b""
    # the first link, sent earlier, still works; nothing else reached the relay
    async with live.http.get(live.base_url + old_link) as resp:
        assert resp.status == 200
    assert len(live.relay.messages) == 3


async def test_resend_link_supersedes_the_waiting_link_and_goes_through_the_outbox(
    live: Harness,
) -> None:
    live.relay.rcpt_replies = [LATER, LATER]
    await live.send(subject="Link nie doszedł")
    found = {r["kind"]: r["id"] for r in await deferred(live, 2)}
    number = await last_ticket(live)
    async with live.db.read() as session:
        content = await session.scalar(
            select(OutboxItem.content).where(OutboxItem.id == found["auth_request"])
        )
    old_link = link_in(parse(content or b""))

    out = (await iq(live, "ticket", "resend-link", str(number))).stdout
    assert "earlier links no longer work" in out
    await arrival(live, 1)  # the new link leaves at once; the old one never does
    [mail] = [parse(m.content) for m in live.relay.messages]
    assert mail.get("X-IQ-Ticket") is None and link_in(mail) != old_link
    [old] = [r for r in await rows(live, "--state", "deleted") if r["id"] == found["auth_request"]]
    assert old["last_error"] == "superseded by a new link"
    async with live.http.get(live.base_url + old_link) as resp:
        assert resp.status == 410
    async with live.http.post(live.base_url + link_in(mail)) as resp:
        assert resp.status == 200
    assert (await live.ticket(number)).authorization == "authorized"


async def test_suppressed_mail_is_listed_with_its_rule(backend: str, tmp_path: Path) -> None:
    limits = {"rate_limit": {"per_recipient_10min": 1}}
    async with harness_on(backend, tmp_path, outbound=limits) as h:
        path = tmp_path / "cli.toml"
        path.write_text(to_toml(h.config.model_dump(by_alias=True, mode="json")))
        h.extra["conf"] = path
        await h.send(subject="Pierwsza")
        await h.drain()
        await h.send(subject="Druga, za szybko")
        await h.drain()
        number = await last_ticket(h)
        [row] = await rows(h, "--state", "suppressed")
        assert (row["ticket"], row["kind"], row["recipient"]) == (number, "auth_request", OWNER)
        assert row["rule"] == "recipient_rate_limit" and row["state"] == "suppressed"
        assert row["message"] == (await h.last_message()).id
        table = (await iq(h, "outbox", "list", "--state", "suppressed")).stdout
        assert "RULE" in table and "recipient_rate_limit" in table
        assert all(r["state"] != "suppressed" for r in await rows(h))


async def test_retention_keeps_a_held_ticket_and_purges_deleted_mail(desk: Harness) -> None:
    """Held mail is live (an operator will act), deleted mail finished: retention
    purges the correspondence only once nothing of it waits any more."""
    from datetime import timedelta

    from iqmaild.deliver import queue

    desk.relay.rcpt_replies = [LATER, LATER]
    await desk.send(subject="Wstrzymane na długo")
    await desk.drain()
    async with desk.db.read() as session:
        rows = {r.kind: r for r in await session.scalars(select(OutboxItem))}
    assert {r.state for r in rows.values()} == {"queued"}
    now = desk.clock.now()
    held = await queue.act(desk.db, "hold", [rows["staff"].id], now, actor="test")
    deleted = await queue.act(desk.db, "delete", [rows["auth_request"].id], now, actor="test")
    assert (held.changed, deleted.changed) == ([rows["staff"].id], [rows["auth_request"].id])
    desk.clock.advance(timedelta(days=95).total_seconds())
    await desk.daemon.retention.run(actor="test")
    number = await last_ticket(desk)
    assert (await desk.ticket(number)).purged_at is None  # the held staff copy waits

    await queue.act(desk.db, "delete", [rows["staff"].id], desk.clock.now(), actor="test")
    await desk.daemon.retention.run(actor="test")
    assert (await desk.ticket(number)).purged_at is not None
    async with desk.db.read() as session:
        after = list(await session.scalars(select(OutboxItem)))
    assert all(r.recipient == "" and r.purged_at is not None for r in after)
    assert desk.relay.messages == []
