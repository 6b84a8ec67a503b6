"""Directory sync from billing (README, "Directory JSON"): `directory import --replace`.

The command runs as an operator runs it, against the database of a running
daemon, whose next decisions follow the new directory. The chunked comparison
is checked across chunk boundaries against the file itself.
"""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from iqmaild.storage.directory import DirectoryError
from iqmaild.storage.directory_sync import CHUNK, read_accounts, replace_directory
from iqmaild.storage.models import Account, Address, Service, Share
from tests.harness import DIRECTORY, Harness, to_toml


def billing() -> dict[str, Any]:
    """The harness's directory as billing now sees it: beta gone, gamma new, acme changed."""
    acme = json.loads(json.dumps(DIRECTORY["accounts"][0]))
    acme["name"] = "ACME S.A."
    acme["additional"] = []  # extra@acme.test left
    acme["services"][0]["shared_with"] = []  # acme-www no longer shared
    gamma = {"id": "gamma", "primary": "Boss@Gamma.test", "lang": "en", "services": [{"id": "g1"}]}
    return {"accounts": [acme, gamma], "exported_at": "2026-12-01T12:00:00Z"}


async def iq(h: Harness, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "cli.toml"
    conf.write_text(to_toml(h.config.model_dump(by_alias=True, mode="json")))
    command = [sys.executable, "-m", "iqmaild.cli", "--config", str(conf), *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120, check=False
    )


async def dump(h: Harness) -> dict[str, Any]:
    """The directory as the database holds it, in the file's shape."""
    async with h.db.read() as session:
        accounts = {a.id: a for a in await session.scalars(select(Account))}
        out: dict[str, Any] = {
            a.id: {"name": a.name, "lang": a.lang, "roles": {}, "services": {}}
            for a in accounts.values()
        }
        for r in await session.scalars(select(Address)):
            out[r.account_id]["roles"][r.email] = r.role
        for s in await session.scalars(select(Service)):
            out[s.account_id]["services"][s.id] = {"name": s.name, "shared_with": set()}
        services = {s.id: s.account_id for s in await session.scalars(select(Service))}
        for sh in await session.scalars(select(Share)):
            out[services[sh.service_id]]["services"][sh.service_id]["shared_with"].add(sh.email)
    return out


def expected(data: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for a in read_accounts(io.BytesIO(json.dumps(data).encode())):
        out[a.id] = {
            "name": a.name,
            "lang": a.lang,
            "roles": a.roles(),
            "services": {
                s.id: {"name": s.name, "shared_with": set(s.shared_with)} for s in a.services
            },
        }
    return out


async def test_replace_makes_the_directory_the_file_and_prints_the_diff(
    desk: Harness, tmp_path: Path
) -> None:
    file = tmp_path / "billing.json"
    file.write_text(json.dumps(billing()), encoding="utf-8")
    before = await dump(desk)

    dry = await iq(desk, tmp_path, "directory", "import", str(file), "--replace", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run, nothing changed" in dry.stdout
    assert await dump(desk) == before

    done = await iq(desk, tmp_path, "directory", "import", str(file), "--replace")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[:-1] == [line for line in dry.stdout.strip().splitlines()[:-1]]
    assert set(lines[:-1]) == {
        "~ account acme (name)",
        "+ account gamma",
        "- address acme extra@acme.test (additional)",
        "+ address gamma boss@gamma.test (primary)",
        "+ service gamma g1",
        "- share acme-www dev@partner.test",
        "- address beta boss@beta.test (primary)",
        "- share beta-vps dev@partner.test",
        "- service beta beta-vps",
        "- account beta",
    }
    assert lines[-1] == (
        "accounts: +1 ~1 -1; addresses: +1 ~0 -2; services: +1 ~0 -1; shares: +0 ~0 -2"
    )
    assert await dump(desk) == expected(billing())
    again = await iq(desk, tmp_path, "directory", "import", str(file), "--replace")
    assert again.stdout.strip() == (
        "accounts: +0 ~0 -0; addresses: +0 ~0 -0; services: +0 ~0 -0; shares: +0 ~0 -0"
    )

    # The running daemon decides by the new directory.
    await desk.send(sender="boss@beta.test", subject="Już nie klient")
    await desk.drain()
    assert (await desk.last_message()).sender_role == "unknown"
    await desk.send(sender="boss@gamma.test", subject="Nowy klient")
    await desk.drain()
    row = await desk.last_message()
    assert (row.sender_role, row.account_id, row.decision) == ("primary", "gamma", "pending")


async def test_an_error_anywhere_in_the_file_changes_nothing(desk: Harness, tmp_path: Path) -> None:
    before = await dump(desk)
    for broken, message in (
        (
            {"accounts": [*billing()["accounts"], {"id": "z", "primary": "not an address"}]},
            "#3 (z)",
        ),
        ({"accounts": [billing()["accounts"][1], billing()["accounts"][1]]}, "appears twice"),
        (
            {
                "accounts": [
                    {"id": "x", "primary": "x@x.test", "services": [{"id": "acme-www"}]},
                    billing()["accounts"][0],
                ]
            },
            "service acme-www appears twice",
        ),
        ({"accounts": [{"id": "x", "primary": "x@x.test", "technical": ["X@x.test"]}]}, "both"),
        ({"accounts": [{"id": "x", "primary": "x@x.test", "shared": []}]}, "Extra inputs"),
        ({"accounts": []}, "refusing to empty"),
    ):
        file = tmp_path / "broken.json"
        file.write_text(json.dumps(broken), encoding="utf-8")
        result = await iq(desk, tmp_path, "directory", "import", str(file), "--replace")
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    (tmp_path / "cut.json").write_text(json.dumps(billing())[:-20], encoding="utf-8")
    result = await iq(
        desk, tmp_path, "directory", "import", str(tmp_path / "cut.json"), "--replace"
    )
    assert result.returncode != 0 and "not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert await dump(desk) == before


def generated(count: int, *, moved: bool) -> dict[str, Any]:
    """``count`` accounts; ``moved``: services move across chunks, some accounts go."""
    accounts = []
    for i in range(count):
        if moved and i % 7 == 3:
            continue  # gone
        services = [{"id": f"s{i}", "name": "S", "shared_with": [f"c{i % 13}@agency.test"]}]
        if moved and i < 50:
            # account i takes over the service of account count-1-i (another chunk)
            services.append({"id": f"s{count - 1 - i}", "shared_with": [f"n{i}@agency.test"]})
        if moved and i >= count - 50:
            services = []
        accounts.append(
            {
                "id": f"a{i:05d}",
                "primary": f"p{i}@a{i}.test" if not (moved and i % 5 == 0) else f"t{i}@a{i}.test",
                "name": f"A{i}" + ("!" if moved and i % 11 == 0 else ""),
                "technical": [f"t{i}@a{i}.test"] if not (moved and i % 5 == 0) else [],
                "additional": [f"x{i}@a{i}.test"] if i % 2 else [],
                "services": services,
            }
        )
    return {"accounts": accounts}


async def test_chunks_and_services_moving_between_them(desk: Harness) -> None:
    count = CHUNK * 2 + 300
    for data in (generated(count, moved=False), generated(count, moved=True)):
        stream = io.BytesIO(json.dumps(data).encode())
        async with desk.db.transaction() as session:
            diff = await replace_directory(session, read_accounts(stream), desk.clock.now())
        assert await dump(desk) == expected(data), diff.summary()
    assert diff.counts["accounts"]["removed"] == len(range(3, count, 7))
    moved = sum(1 for i in range(50) if i % 7 != 3)  # taken over by an account still there
    assert diff.counts["services"]["changed"] == moved


async def test_a_failure_rolls_the_whole_replace_back(desk: Harness) -> None:
    before = await dump(desk)
    data = generated(CHUNK + 10, moved=False)
    data["accounts"][-1]["technical"] = ["broken"]
    with pytest.raises(DirectoryError, match="is not an email address"):
        async with desk.db.transaction() as session:
            await replace_directory(
                session, read_accounts(io.BytesIO(json.dumps(data).encode())), desk.clock.now()
            )
    assert await dump(desk) == before  # the first chunk, written already, is gone too
