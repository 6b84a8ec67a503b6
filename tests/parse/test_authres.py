"""DMARC results through the daemon: only our own MTA's word counts (THREAT_MODEL row
"DMARC-failing From"). A sender can write any Authentication-Results it likes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness import Harness, start_harness, stop_harness

OURS = "mx.desk.test"


@pytest.fixture
async def enforcing(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(
        tmp_path, security={"dmarc_enforce": True, "trusted_authserv_ids": [OURS]}
    )
    try:
        yield h
    finally:
        await stop_harness(h)


def results(host: str, verdict: str, domain: str = "acme.test") -> str:
    return f"{host}; spf=pass smtp.mailfrom={domain}; dmarc={verdict} header.from={domain}"


async def decided(h: Harness, *headers: str) -> tuple[str, list[str]]:
    """Send the owner's new request with these Authentication-Results, top first."""
    extra = "".join(f"Authentication-Results: {v}\r\n" for v in headers)
    raw = (
        f"{extra}From: owner@acme.test\r\nTo: bok@desk.test\r\nSubject: Hasło\r\n"
        f"Message-ID: <{len(h.relay.messages)}.{len(headers)}@client.test>\r\n"
        "\r\nProszę o hasło.\r\n"
    ).encode()
    assert (await h.send_raw(raw))[0] == 250
    await h.drain()
    row = await h.last_message()
    return row.decision, row.reasons


async def test_a_fail_from_our_own_mta_refuses(enforcing: Harness) -> None:
    assert await decided(enforcing, results(OURS, "fail")) == ("unauthorized", ["dmarc_fail"])


async def test_a_fail_claimed_by_another_host_is_ignored(enforcing: Harness) -> None:
    decision, _ = await decided(enforcing, results("mx.evil.test", "fail"))
    assert decision == "pending"


async def test_a_pass_forged_below_our_mtas_fail_changes_nothing(enforcing: Harness) -> None:
    """Our MTA prepends its header: the first trusted one is its own, not the sender's."""
    got = await decided(enforcing, results(OURS, "fail"), results(OURS, "pass"))
    assert got == ("unauthorized", ["dmarc_fail"])


async def test_a_result_about_another_domain_is_not_about_this_from(enforcing: Harness) -> None:
    decision, _ = await decided(enforcing, results(OURS, "fail", domain="other.test"))
    assert decision == "pending"
