"""`iqmaild retention run` as an operator runs it: a real process on the daemon's database.

The daemon's clock starts four months in the past, so the mail it handles has
ended its three months by the time the CLI (the system clock) looks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from iqmaild.clock import FakeClock
from iqmaild.config import ConfigError, parse_config
from tests.harness import Harness, config_dict, start_harness, stop_harness
from tests.lifecycle.test_gdpr import config_file, iq
from tests.pg import temp_database


@pytest.fixture
async def past_desk(backend: str, tmp_path: Path) -> AsyncIterator[Harness]:
    clock = FakeClock(datetime.now(UTC) - timedelta(days=125))
    if backend == "sqlite":
        h = await start_harness(tmp_path, clock=clock)
        try:
            yield h
        finally:
            await stop_harness(h)
        return
    async with temp_database() as url:
        h = await start_harness(tmp_path, db_url=url, clock=clock)
        try:
            yield h
        finally:
            await stop_harness(h)


async def test_dry_run_counts_then_run_purges(past_desk: Harness, tmp_path: Path) -> None:
    h = past_desk
    number = await h.authorized_ticket("Faktura")
    await h.send(sender="stranger@nowhere.test", subject="Hello")
    await h.drain()
    conf = config_file(h, tmp_path)

    dry = json.loads(iq(conf, "retention", "run", "--dry-run", "--json").stdout)
    assert dry["dry_run"] is True
    assert dry["counts"]["tickets"] == 2 and dry["counts"]["messages"] == 2
    assert (await h.ticket(number)).purged_at is None
    text = iq(conf, "retention", "run", "--dry-run").stdout
    assert "personal data 3 months, claims 6 years, security events 2 years" in text
    assert "tickets" in text

    done = json.loads(iq(conf, "retention", "run", "--json", "--actor", "ops").stdout)
    assert done["counts"] == dry["counts"]
    ticket = await h.ticket(number)
    assert ticket.purged_at is not None and ticket.requester is None
    show = json.loads(iq(conf, "ticket", "show", str(number), "--json").stdout)
    assert show["number"] == number and show["subject"] == "" and show["requester"] == ""
    assert all(m["body"] == "" for m in show["messages"])
    again = json.loads(iq(conf, "retention", "run", "--json").stdout)
    assert set(again["counts"].values()) == {0}


def test_retention_periods_are_validated() -> None:
    base = config_dict("sqlite+aiosqlite:////tmp/x.db", 25)
    for values, message in (
        ({"personal_data_months": 0}, "personal_data_months"),
        ({"claims_years": 0}, "claims_years"),
        ({"security_years": 0}, "security_years"),
        ({"batch_size": 0}, "batch_size"),
        ({"personal_data_months": 13, "claims_years": 1}, "claims_years: shorter"),
        ({"keep_forever": True}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "retention": values})
    config = parse_config({**base, "retention": {"personal_data_months": 1, "daily": False}})
    assert config.retention.periods.personal_data_months == 1
    assert parse_config(base).retention.periods.claims_years == 6
