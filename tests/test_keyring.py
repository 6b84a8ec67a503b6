"""Rotating the secret key through the real daemon (README, "Rotating the secret key").

One database, three daemons after each other: the old single ``secret_key``;
the ring with a new current key and the old one behind it (everything mailed
before still works, new mail is signed with the new key); the ring without the
old key (what only it signed is refused).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from iqmaild.apply import tickets
from iqmaild.config import ConfigError, parse_config
from iqmaild.core.keys import KeyRing
from iqmaild.storage.models import OutboxItem
from tests.harness import (
    STAFF,
    Harness,
    config_dict,
    parse,
    start_harness,
    stop_harness,
    to_toml,
)
from tests.pg import temp_database

OWNER = "owner@acme.test"
OLD = "test-secret-key-0123456789abcdef-xyz"  # the harness's single secret_key
NEW = "the-new-key-after-the-leak-0123456789abcdef"
ROTATED = {"secret_key": "", "secret_keys": [{"id": 1, "key": NEW}, {"id": 0, "key": OLD}]}
DROPPED = {"secret_key": "", "secret_keys": [{"id": 1, "key": NEW}]}


@asynccontextmanager
async def database(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ring.db'}"
        return
    async with temp_database() as url:
        yield url


@asynccontextmanager
async def daemon(url: str, tmp_path: Path, **security: Any) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path, db_url=url, security=security)
    try:
        yield h
    finally:
        await stop_harness(h)


async def reply(h: Harness, subject: str, **headers: str) -> Any:
    await h.send(subject=subject, headers=headers or None)
    await h.drain()
    return await h.last_message()


async def test_rotation_keeps_what_was_mailed_until_the_old_key_is_dropped(
    backend: str, tmp_path: Path
) -> None:
    async with database(backend, tmp_path) as url:
        async with daemon(url, tmp_path) as h:  # before: one secret_key
            number = await h.authorized_ticket()
            old_tag = await h.tag(number)
            [ack] = [
                parse(m.content)
                for m in h.relay.messages
                if m.rcpt_tos == [OWNER] and old_tag.encode() in m.content
            ]
            old_msgid = ack["Message-ID"]
            # the staff copy of a follow-up: its return path and loop mark
            await h.send(subject=f"Re: {old_tag} jeszcze")
            await h.drain()
            staff = next(m for m in h.relay.messages[::-1] if m.rcpt_tos == [STAFF])
            old_verp, old_copy = staff.mail_from, staff.content
            h.new_mail()

        async with daemon(url, tmp_path, **ROTATED) as h:
            ticket = await h.ticket(number)
            new_tag = f"[IQ.pl#{number}:{tickets.code_of(h.config.keys, ticket)}]"
            assert new_tag != old_tag
            row = await reply(h, f"Re: {old_tag} stary kod")
            assert (row.decision, row.ticket_id) == ("authorized", ticket.id), row.reasons
            row = await reply(h, "Bez tagu", **{"In-Reply-To": old_msgid})
            assert row.ticket_id == ticket.id  # the old signed Message-ID still threads
            mail = [m for m in h.new_mail() if m.envelope_to != [STAFF]]
            assert any(new_tag in (m["Subject"] or "") for m in mail)  # signed anew
            assert not any(old_tag in (m["Subject"] or "") for m in mail)
            # a report to the old return path is still ours, filed under its row
            assert (await h.send_raw(b"Subject: x\r\n\r\nbounce\r\n", "", [old_verp]))[0] == 250
            # our old staff copy coming back is still recognised as a loop
            assert (await h.send_raw(old_copy, mail_from=STAFF))[0] == 250
            await h.drain()
            row = await h.last_message()
            assert (row.decision, row.rules_hit[0]) == ("ignored", "own_mail_returned")
            async with h.db.read() as session:
                ids = [r.id for r in await session.scalars(select(OutboxItem))]
            verp = next(m.mail_from for m in h.relay.messages if m.rcpt_tos == [STAFF])
            assert verp.startswith("bok+bounce-") and int(verp.split("-")[1]) in ids

        async with daemon(url, tmp_path, **DROPPED) as h:
            row = await reply(h, f"Re: {old_tag} po usunięciu klucza")
            assert row.decision != "authorized" and "code_mismatch" in row.reasons
            row = await reply(h, f"Re: {new_tag} nowy kod")
            assert row.decision == "authorized"
            reply_code, _ = await h.send_raw(b"Subject: x\r\n\r\nbounce\r\n", "", [old_verp])
            assert reply_code == 550  # a return path only the dropped key signed


def test_a_ring_is_configured_with_ids_and_only_one_way(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"

    def parsed(**security: Any) -> Any:
        return parse_config(config_dict(url, 25, security=security))

    ring = parsed(**ROTATED)
    assert ring.keys == KeyRing(((1, NEW.encode()), (0, OLD.encode())))
    assert ring.key == NEW.encode()
    assert parsed().keys == KeyRing(((0, OLD.encode()),))
    for security, expected in (
        ({"secret_keys": [{"id": 1, "key": NEW}]}, "not both"),
        ({"secret_key": ""}, "missing required key"),
        ({"secret_key": "", "secret_keys": [{"id": 1, "key": "short"}]}, "32 characters"),
        (
            {"secret_key": "", "secret_keys": [{"id": 1, "key": NEW}, {"id": 1, "key": OLD}]},
            "distinct",
        ),
        (
            {"secret_key": "", "secret_keys": [{"id": 1, "key": NEW}, {"id": 2, "key": NEW}]},
            "twice",
        ),
        ({"secret_key": "", "secret_keys": [{"id": -1, "key": NEW}]}, "secret_keys"),
    ):
        with pytest.raises(ConfigError, match=expected):
            parsed(**security)


def test_check_config_names_the_ring(tmp_path: Path) -> None:
    data = config_dict(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}", 25, security=ROTATED)
    conf = tmp_path / "ring.toml"
    security = data.pop("security")
    ring = ", ".join(f'{{ id = {e["id"]}, key = "{e["key"]}" }}' for e in security["secret_keys"])
    conf.write_text(to_toml(data) + f"[security]\nsecret_keys = [{ring}]\n")
    done = subprocess.run(
        [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "key ids 1, 0 (the first signs)" in done.stdout
