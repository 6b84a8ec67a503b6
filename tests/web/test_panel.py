"""The Customer Panel's ticket API over real HTTP (DESIGN.md: "Interfaces", panel channel).

Only the panel's bearer token may create tickets; they are authorized at once,
carry the service the panel names, and the owner gets an acknowledgement with
the full tag.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from iqmaild.storage.models import Message, Ticket
from tests.harness import PANEL_TOKEN, STAFF, Harness, start_harness, stop_harness

OWNER = "owner@acme.test"
API = "/api/v1/tickets"
GOOD = {
    "account_id": "acme",
    "service_id": "acme-www",
    "subject": "Nie działa WWW",
    "body": "Dzień dobry,\nstrona acme.test zwraca błąd 500.\n",
}
AUTH = {"Authorization": f"Bearer {PANEL_TOKEN}"}


async def post(h: Harness, payload: Any = GOOD, headers: dict[str, str] | None = None, **kw: Any):
    headers = AUTH if headers is None else headers
    if isinstance(payload, bytes | str):
        kw["data"] = payload
        headers = {**headers, "Content-Type": "application/json"}
    else:
        kw["json"] = payload
    async with h.http.post(h.base_url + API, headers=headers, **kw) as resp:
        body = await resp.json()
        return resp.status, body, resp.headers


async def counts(h: Harness) -> tuple[int, int]:
    async with h.db.read() as session:
        tickets = await session.scalar(select(func.count(Ticket.id)))
        messages = await session.scalar(select(func.count(Message.id)))
    return int(tickets or 0), int(messages or 0)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {PANEL_TOKEN}x"},
        {"Authorization": f"Basic {PANEL_TOKEN}"},
        {"Authorization": PANEL_TOKEN},
        {"Authorization": "Bearer "},
    ],
)
async def test_without_the_panel_token_401(desk: Harness, headers: dict[str, str]) -> None:
    status, body, resp_headers = await post(desk, headers=headers)
    assert status == 401
    assert body == {"error": "unauthorized"}
    assert resp_headers["WWW-Authenticate"] == "Bearer"
    assert await counts(desk) == (0, 0)


async def test_without_a_configured_token_the_api_is_closed(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, http={"panel_token": ""})
    try:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}):
            status, _, _ = await post(h, headers=headers)
            assert status == 401
        assert await counts(h) == (0, 0)
    finally:
        await stop_harness(h)


async def test_a_panel_ticket_is_authorized_at_once(desk: Harness) -> None:
    status, body, _ = await post(desk)
    assert status == 201, body
    assert body["number"] == 1000
    assert re.fullmatch(r"\[IQ\.pl#1000:[0-9a-f]{20}\]", body["tag"])
    assert body["tag"] == await desk.tag(1000)
    assert body["authorization"] == "authorized"

    ticket = await desk.ticket(1000)
    assert (ticket.authorization, ticket.account_id, ticket.service_id, ticket.channel) == (
        "authorized",
        "acme",
        "acme-www",
        "panel",
    )
    row = await desk.last_message()
    assert (row.channel, row.decision, row.ticket_id) == ("panel", "authorized", ticket.id)

    await desk.drain()
    mails = desk.new_mail()
    [ack] = [m for m in mails if m.envelope_to == [OWNER]]
    [staff] = [m for m in mails if m.envelope_to == [STAFF]]
    assert str(ack["Subject"]).count(body["tag"]) == 1
    assert "Nie działa WWW" in str(ack["Subject"])
    assert ack["Auto-Submitted"] == "auto-replied"
    assert staff.get_all("X-IQ-Authorization") == ["authorized"]
    assert staff.get_all("X-IQ-Ticket") == ["1000"]
    assert staff.get_all("X-IQ-Account") == ["acme"]
    assert "strona acme.test" in staff.get_body(preferencelist=("plain",)).get_content()
    assert len(mails) == 2


async def test_a_panel_ticket_without_a_service(desk: Harness) -> None:
    payload = {k: v for k, v in GOOD.items() if k != "service_id"}
    status, body, _ = await post(desk, payload)
    assert status == 201
    ticket = await desk.ticket(body["number"])
    assert (ticket.authorization, ticket.service_id) == ("authorized", None)


async def test_the_panel_subject_cannot_inject_headers(desk: Harness) -> None:
    payload = {**GOOD, "subject": "Nie działa\r\nBcc: victim@evil.test\r\nX-IQ-Ticket: 1"}
    status, _, _ = await post(desk, payload)
    assert status == 201
    await desk.drain()
    assert {tuple(m.rcpt_tos) for m in desk.relay.messages} == {(OWNER,), (STAFF,)}
    for captured in desk.relay.messages:
        assert not re.search(rb"(?im)^bcc\s*:", captured.content)
    [staff] = [m for m in desk.new_mail() if m.envelope_to == [STAFF]]
    assert staff.get_all("X-IQ-Ticket") == ["1000"]


@pytest.mark.parametrize(
    "payload",
    [
        {**GOOD, "account_id": "nosuch"},
        {**GOOD, "service_id": "beta-vps"},  # a service of another account
        {**GOOD, "service_id": "nosuch-service"},
    ],
)
async def test_unknown_account_or_foreign_service_404(desk: Harness, payload: Any) -> None:
    status, body, _ = await post(desk, payload)
    assert status == 404
    assert "error" in body
    assert await counts(desk) == (0, 0)


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        "",
        b"\xff\xfe",
        [GOOD],
        "null",
        {**GOOD, "priority": "high"},  # an extra field
        {**GOOD, "subject": ""},
        {k: v for k, v in GOOD.items() if k != "subject"},
        {**GOOD, "account_id": 7},
        {**GOOD, "body": None},
    ],
)
async def test_invalid_requests_422(desk: Harness, payload: Any) -> None:
    status, body, _ = await post(desk, payload)
    assert status == 422
    assert body["error"] == "invalid request"
    assert await counts(desk) == (0, 0)


async def test_wrong_tokens_are_rate_limited_per_client(tmp_path: Path) -> None:
    h = await start_harness(tmp_path, http={"panel_failures_per_minute": 3})
    try:
        wrong = {"Authorization": "Bearer " + "x" * 40}
        statuses = [(await post(h, headers=wrong))[0] for _ in range(5)]
        assert statuses == [401, 401, 401, 429, 429]
        assert (await post(h))[0] == 429  # checked before any comparison: no oracle
    finally:
        await stop_harness(h)


async def test_hostile_requests_get_4xx_not_500(desk: Harness) -> None:
    panel = desk
    async with panel.http.post(
        panel.base_url + API, headers={"Authorization": b"Bearer \xff\xfe".decode("latin-1")}
    ) as resp:
        assert resp.status == 401
    status, body, _ = await post(panel, "[" * 100_000 + "]" * 100_000)
    assert (status, body["error"]) == (422, "invalid request")
    status, _, _ = await post(panel, b"\xff\xfe not json")
    assert status == 422


@pytest.mark.parametrize("token", ["x", "short-token", "é" * 40])
def test_a_weak_panel_token_is_refused_by_check_config(token: str) -> None:
    from iqmaild.config import ConfigError, parse_config
    from tests.harness import config_dict

    data = config_dict("sqlite+aiosqlite:///x.db", 25)
    data["http"]["panel_token"] = token
    with pytest.raises(ConfigError, match=r"http\.panel_token"):
        parse_config(data)
