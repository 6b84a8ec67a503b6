"""The data subject's rights (issue 8, item 2): export and erase, through the real CLI,
on both back ends, against a daemon that holds the mail.

The address is found as the rules normalize it, in whatever case it was written,
as requester, in From and in Cc as stored; after erasure it appears nowhere in
the database, and when it writes again it is simply unknown.
"""

from __future__ import annotations

import email
import getpass
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from email import policy
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from iqmaild.core.policy import PURGED_TICKET
from iqmaild.storage.models import Base, Message, Ticket
from tests.conftest import harness_on
from tests.harness import Harness, to_toml

OWNER = "owner@acme.test"


def config_file(h: Harness, tmp_path: Path) -> Path:
    """The harness daemon's config for the CLI (same database)."""
    path = tmp_path / "cli.toml"
    path.write_text(to_toml(h.config.model_dump(mode="json", by_alias=True)), encoding="utf-8")
    return path


def iq(conf: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


async def everything(h: Harness) -> list[tuple[str, str, Any]]:
    """Every value of every row of every table."""
    out = []
    async with h.db.read() as session:
        for table in Base.metadata.sorted_tables:
            for row in await session.execute(select(table)):
                for column, value in row._mapping.items():
                    out.append((table.name, str(column), value))
    return out


def naming(values: list[tuple[str, str, Any]], address: str) -> list[tuple[str, str]]:
    needle = address.lower()
    found = []
    for table, column, value in values:
        text = value.lower() if isinstance(value, bytes) else str(value).lower().encode()
        if needle.encode() in text:
            found.append((table, column))
    return found


@pytest.fixture
async def desk(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness_on(backend, tmp_path) as h:
        yield h


async def test_export_then_erase_an_address_written_in_any_case(
    desk: Harness, tmp_path: Path
) -> None:
    h = desk
    own = await h.authorized_ticket("Faktura")  # owner is the requester
    # Someone else's ticket, the owner in Cc as the mail wrote it.
    await h.send(sender="mail-admin@partner.test", cc=["Owner <OWNER@Acme.Test>"], subject="DNS")
    await h.drain()
    cc_message = await h.last_message()
    other = await h.authorized_ticket("Inna sprawa")  # owner again
    # Someone else's mail that names the owner only in Reply-To.
    await h.send(sender="boss@beta.test", subject="Zwrot", headers={"Reply-To": OWNER})
    await h.drain()
    reply_to_message = await h.last_message()
    await h.send(sender="boss@beta.test", subject="VPS")  # nothing of the owner
    await h.drain()
    beta = await h.last_message()
    async with h.db.read() as session:
        mine = {t.id for t in await session.scalars(select(Ticket)) if t.requester == OWNER}
        owner_messages = {
            m.id: m.raw
            for m in await session.scalars(select(Message))
            if m.ticket_id in mine or m.id in (cc_message.id, reply_to_message.id)
        }
    assert len(mine) == 2 and cc_message.ticket_id not in mine
    conf = config_file(h, tmp_path)

    out = tmp_path / "export"
    shown = iq(conf, "gdpr", "export", "  Owner@ACME.test ", "--out", str(out), "--actor", "iod-7")
    assert "exported" in shown.stdout
    data = json.loads((out / "data.json").read_text(encoding="utf-8"))
    assert data["address"] == OWNER
    assert {t["number"] for t in data["tickets"] if t["requested_by_address"]} == {own, other}
    assert {m["id"] for m in data["messages"]} == set(owner_messages)
    assert beta.id not in {m["id"] for m in data["messages"]}
    for m in data["messages"]:
        assert (out / m["eml"]).read_bytes() == owner_messages[m["id"]]
    sent = [o for o in data["outbox"] if o["recipient"] == OWNER]
    assert {o["kind"] for o in sent} >= {"auth_request", "acknowledgement"}
    assert all(o["content_sha256"] for o in sent)
    for o in (o for o in sent if o["eml"]):  # mail the relay took is no longer kept
        parsed = email.message_from_bytes((out / o["eml"]).read_bytes(), policy=policy.default)
        assert OWNER in str(parsed["To"]).lower()
    assert [a["role"] for a in data["directory"]["addresses"]] == ["primary"]
    assert data["directory"]["accounts_where_primary"][0]["id"] == "acme"
    assert any(a["event"] == "authlink.confirmed" for a in data["audit_events"])
    assert (out / "data.json").stat().st_mode & 0o077 == 0  # personal data: owner only
    again = iq(conf, "gdpr", "export", OWNER, "--out", str(out), check=False)
    assert again.returncode != 0 and "not empty" in again.stderr

    dry = json.loads(iq(conf, "gdpr", "erase", OWNER.upper(), "--dry-run", "--json").stdout)
    counts = dry["counts"]
    assert counts["tickets"] == 2 and counts["messages"] == len(owner_messages)
    assert counts["directory_addresses"] == 1 and counts["directory_shares"] == 0
    assert naming(await everything(h), OWNER)  # a dry run erases nothing

    erased = iq(conf, "gdpr", "erase", OWNER, "--actor", "iod-7")
    assert "billing" in erased.stdout  # the directory is billing's: say so
    left = naming(await everything(h), OWNER)
    assert left == [], left
    async with h.db.read() as session:
        rows = await session.execute(
            select(Base.metadata.tables["audit_events"]).where(
                Base.metadata.tables["audit_events"].c.event.like("gdpr.%")
            )
        )
        audits = {r.event: r for r in rows}
        beta_now = await session.get(Message, beta.id)
        cc_ticket = await session.get(Ticket, cc_message.ticket_id)
    assert set(audits) == {"gdpr.export", "gdpr.erase"}
    assert {a.actor for a in audits.values()} == {"iod-7"}
    assert audits["gdpr.erase"].data["counts"] == counts
    assert beta_now is not None and beta_now.raw == beta.raw  # others' mail untouched
    assert cc_ticket is not None and cc_ticket.purged_at is None  # mail-admin's ticket stays
    assert cc_ticket.requester == "mail-admin@partner.test"

    # The erased address writes again: simply unknown, also with an old ticket's tag.
    await h.send(subject="Jeszcze raz")
    await h.drain()
    fresh = await h.last_message()
    assert fresh.sender_role == "unknown" and fresh.reasons == ["unknown_sender"]
    assert fresh.ticket_id not in mine
    await h.send(subject=f"Re: [IQ.pl#{own}] stara sprawa")
    await h.drain()
    late = await h.last_message()
    assert PURGED_TICKET in late.rules_hit and late.ticket_id not in mine
    assert late.reasons == ["unknown_sender"]


async def test_bad_address_and_unknown_address(desk: Harness, tmp_path: Path) -> None:
    conf = config_file(desk, tmp_path)
    bad = iq(conf, "gdpr", "erase", "not-an-address", check=False)
    assert bad.returncode != 0 and "not an email address" in bad.stderr
    nobody = json.loads(iq(conf, "gdpr", "erase", "nobody@nowhere.test", "--json").stdout)
    assert set(nobody["counts"].values()) == {0}
    async with desk.db.read() as session:
        table = Base.metadata.tables["audit_events"]
        rows = list(await session.execute(select(table).where(table.c.event == "gdpr.erase")))
    assert [r.actor for r in rows] == [f"cli:{getpass.getuser()}"]  # who: the OS user
    assert "nowhere" not in json.dumps(rows[0].data)
