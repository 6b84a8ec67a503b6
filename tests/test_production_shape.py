"""The customer story as production runs it: the worker process on, no drain().

drain() keeps the other tests deterministic but would hide a wake-up that only
production needs (the outbox after a click, the worker after a commit). Here the
mail must leave by itself, and soon: the bounds are generous multiples of what
is normal (well under a second), far below the 20 s an idle timer once cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import harness_on
from tests.harness import STAFF, Harness, link_in, parse

OWNER = "owner@acme.test"
SOON = 5.0  # seconds


@pytest.fixture
async def live(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness_on(backend, tmp_path, background=True) as h:
        yield h


async def arrival(h: Harness, count: int, seconds: float = SOON) -> float:
    """Seconds until the relay holds ``count`` messages."""
    start = time.monotonic()
    while len(h.relay.messages) < count:
        if time.monotonic() - start > seconds:
            got = [m.rcpt_tos for m in h.relay.messages]
            raise AssertionError(f"{count} mails not at the relay after {seconds} s: {got}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_mail_leaves_by_itself_soon_after_the_250_and_after_the_click(
    live: Harness,
) -> None:
    await live.send(subject="Bez drain()")
    await arrival(live, 2)  # the link and the staff copy, the worker woken by the commit
    link = next(parse(m.content) for m in live.relay.messages if m.rcpt_tos == [OWNER])
    async with live.http.post(live.base_url + link_in(link)) as resp:
        assert resp.status == 200
    await arrival(live, 4)  # the acknowledgement and the authorized staff copy
    kinds = {
        (tuple(m.rcpt_tos), parse(m.content)["X-IQ-Authorization"]) for m in live.relay.messages
    }
    assert ((STAFF,), "authorized") in kinds and ((OWNER,), None) in kinds


async def test_mail_queued_by_the_cli_leaves_without_a_wake_up(live: Harness) -> None:
    """Another process (the CLI) queues a link: the worker's poll finds it."""
    from iqmaild.cli.tickets import reissue_link

    await live.send(subject="Link ginie")
    await arrival(live, 2)
    number = (await live.last_message()).ticket_id
    assert number is not None
    async with live.db.read() as session:
        from iqmaild.storage.models import Ticket

        ticket = await session.get(Ticket, number)
        assert ticket is not None
    await reissue_link(live.config, live.db, ticket.number)
    await arrival(live, 3)


async def test_the_worker_runs_below_intake_on_the_cpu(live: Harness) -> None:
    """When the cores are busy, the 250s the MTA waits for go first."""
    import os

    supervisor = live.daemon.worker
    assert supervisor is not None and supervisor.proc is not None
    await live.send(subject="Priorytet")
    await arrival(live, 2)  # the worker is up and working
    worker = supervisor.proc.pid
    nice = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[16])
    ours = os.nice(0)  # a test run may itself be niced: the kernel caps at 19
    assert live.config.processing.worker_nice == 10
    assert nice == min(19, ours + 10) and (nice > ours or ours == 19)
