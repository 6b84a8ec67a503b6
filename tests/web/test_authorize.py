"""The authorization link over real HTTP (DESIGN.md: "Authorization links").

GET only shows a page (mail scanners pre-fetch links); POST authorizes, once,
also under concurrent clicks; unknown, used, expired and garbage tokens get
clear pages; attempts are rate-limited; pages escape what customers wrote.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from multidict import CIMultiDictProxy
from sqlalchemy import func, select, update
from yarl import URL

from iqmaild.storage.models import AuditEvent, AuthToken, Message
from tests.harness import STAFF, Harness, link_in, start_harness, stop_harness

OWNER = "owner@acme.test"


async def new_link(h: Harness, subject: str = "Problem z pocztą") -> str:
    """Send a new mail from the owner and return the path of its authorization link."""
    await h.send(subject=subject)
    await h.drain()
    [auth] = [m for m in h.new_mail() if m.envelope_to == [OWNER]]
    return link_in(auth)


async def token_row(h: Harness) -> AuthToken:
    async with h.db.read() as session:
        row = await session.scalar(select(AuthToken))
        assert row is not None
        return row


def assert_page(headers: CIMultiDictProxy[str], page: str) -> None:
    """One of our HTML pages, never cached, never leaking the link as a referrer."""
    assert headers["Content-Type"].startswith("text/html")
    assert headers["Cache-Control"] == "no-store"
    assert headers["Referrer-Policy"] == "no-referrer"
    assert page.lstrip().lower().startswith("<!doctype html")
    assert "Traceback" not in page and "Exception" not in page


async def test_get_shows_a_form_and_authorizes_nothing(desk: Harness) -> None:
    path = await new_link(desk)
    for _ in range(3):  # a mail scanner fetching the link again and again
        async with desk.http.get(desk.base_url + path) as resp:
            page = await resp.text()
            assert resp.status == 200
            assert_page(resp.headers, page)
    assert "<form" in page and 'method="post"' in page
    # Relative, so the button also posts to the right place behind a path prefix.
    assert f'action="{path.rsplit("/", 1)[1]}"' in page
    assert "1000" in page and "Problem z pocztą" in page and OWNER in page
    assert (await desk.ticket(1000)).authorization == "pending"
    assert (await token_row(desk)).used_at is None
    await desk.drain()
    assert desk.new_mail() == []  # no acknowledgement, no staff copy


async def test_post_authorizes_and_a_second_click_gets_410(desk: Harness) -> None:
    path = await new_link(desk)
    async with desk.http.post(desk.base_url + path) as resp:
        page = await resp.text()
        assert resp.status == 200
        assert_page(resp.headers, page)
    assert (await desk.ticket(1000)).authorization == "authorized"
    for method in ("GET", "POST"):
        async with desk.http.request(method, desk.base_url + path) as resp:
            page = await resp.text()
            assert resp.status == 410
            assert_page(resp.headers, page)


async def test_unknown_token_gets_a_404_page(desk: Harness) -> None:
    await new_link(desk)
    path = "/authorize/" + secrets.token_urlsafe(32)
    for method in ("GET", "POST"):
        async with desk.http.request(method, desk.base_url + path) as resp:
            page = await resp.text()
            assert resp.status == 404
            assert_page(resp.headers, page)
    assert (await desk.ticket(1000)).authorization == "pending"


async def test_expired_token_gets_a_410_page_and_authorizes_nothing(desk: Harness) -> None:
    path = await new_link(desk)
    async with desk.db.transaction() as session:
        await session.execute(
            update(AuthToken).values(expires_at=desk.clock.now() - timedelta(minutes=1))
        )
    for method in ("GET", "POST"):
        async with desk.http.request(method, desk.base_url + path) as resp:
            page = await resp.text()
            assert resp.status == 410
            assert_page(resp.headers, page)
    assert (await desk.ticket(1000)).authorization == "pending"
    assert (await token_row(desk)).used_at is None


@pytest.mark.parametrize(
    "token",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "..%2F..%2Fetc",
        "A" * 4000,
        "%C5%BC%C3%B3%C5%82w-" + "x" * 40,  # "żółw-xxx…"
        "abc",
        "%00" * 30,
        "x" * 43 + "%27%20OR%201=1--",
    ],
)
async def test_garbage_tokens_get_a_404_page(desk: Harness, token: str) -> None:
    url = URL(desk.base_url + "/authorize/" + token, encoded=True)
    for method in ("GET", "POST"):
        async with desk.http.request(method, url) as resp:
            page = await resp.text()
            assert resp.status == 404, page[:300]
            assert_page(resp.headers, page)


async def test_concurrent_posts_authorize_exactly_once(any_desk: Harness) -> None:
    desk = any_desk
    path = await new_link(desk)

    async def click() -> int:
        async with desk.http.post(desk.base_url + path) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(click() for _ in range(10)))
    assert sorted(statuses) == [200] + [410] * 9
    assert (await desk.ticket(1000)).authorization == "authorized"
    await desk.drain()
    mails = desk.new_mail()
    acks = [m for m in mails if m.envelope_to == [OWNER]]
    staff = [m for m in mails if m.envelope_to == [STAFF]]
    assert len(acks) == 1
    assert str(acks[0]["Subject"]).count(await desk.tag(1000)) == 1
    assert [m["X-IQ-Authorization"] for m in staff] == ["authorized"]
    async with desk.db.read() as session:
        confirmed = await session.scalar(
            select(func.count(AuditEvent.id)).where(AuditEvent.event == "authlink.confirmed")
        )
        decisions = list(await session.scalars(select(Message.decision)))
    assert confirmed == 1
    assert decisions == ["authorized"]


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start_harness(tmp_path, http={"authorize_attempts_per_minute": 3})
    try:
        yield h
    finally:
        await stop_harness(h)


async def test_attempts_are_rate_limited(limited: Harness) -> None:
    path = await new_link(limited)
    guesses = ["/authorize/" + secrets.token_urlsafe(32) for _ in range(3)]
    for guess in guesses:
        async with limited.http.get(limited.base_url + guess) as resp:
            assert resp.status == 404
    # The fourth attempt is refused, even with the right token and a POST.
    for method in ("POST", "GET"):
        async with limited.http.request(method, limited.base_url + path) as resp:
            page = await resp.text()
            assert resp.status == 429
            assert_page(resp.headers, page)
    assert (await limited.ticket(1000)).authorization == "pending"
    # Health and metrics are not link attempts.
    async with limited.http.get(limited.base_url + "/healthz") as resp:
        assert resp.status == 200
    async with limited.http.get(limited.base_url + "/metrics") as resp:
        assert "iqmaild_authorize_rate_limited_total 2.0" in await resp.text()


async def test_the_subject_is_escaped_on_the_pages(desk: Harness) -> None:
    evil = '<script>alert(1)</script> "x" <img src=x onerror=alert(2)>'
    path = await new_link(desk, subject=evil)
    for method in ("GET", "POST"):
        async with desk.http.request(method, desk.base_url + path) as resp:
            page = await resp.text()
            assert resp.status == 200
        assert "<script>alert(1)" not in page
        assert "<img src=x" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


async def test_healthz_is_json(desk: Harness) -> None:
    async with desk.http.get(desk.base_url + "/healthz") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        body = await resp.json()
        assert body["status"] == "ok"
        assert set(body["checks"]) >= {"database", "listeners", "relay", "outbox", "classifier"}


async def test_metrics_are_prometheus_text(desk: Harness) -> None:
    await desk.send()
    await desk.send(subject="Drugie")
    async with desk.http.get(desk.base_url + "/metrics") as resp:
        text = await resp.text()
        assert resp.status == 200
        assert resp.content_type == "text/plain"
    assert "# TYPE iqmaild_smtp_accepted_total counter" in text
    assert "\niqmaild_smtp_accepted_total 2.0\n" in text
    for line in text.splitlines():
        assert line.startswith("# ") or line.startswith("iqmaild_"), line


async def test_a_link_whose_share_was_revoked_authorizes_nothing(desk: Harness) -> None:
    from iqmaild.storage.directory import revoke_share
    from tests.harness import link_in

    await desk.send(sender="mail-admin@partner.test", subject="Skrzynka pełna")
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == ["mail-admin@partner.test"])
    async with desk.db.transaction() as session:
        await revoke_share(session, "acme-mail", "mail-admin@partner.test")
    async with desk.http.post(desk.base_url + link_in(auth)) as resp:
        assert resp.status == 410
    assert (await desk.ticket(1000)).authorization == "pending"
    async with desk.http.post(desk.base_url + link_in(auth)) as resp:
        assert resp.status == 410  # spent, not retried later after a re-grant


async def test_behind_a_trusted_proxy_each_client_has_its_own_limit(tmp_path: Path) -> None:
    h = await start_harness(
        tmp_path, http={"authorize_attempts_per_minute": 2, "trusted_proxies": ["127.0.0.1"]}
    )
    try:
        guess = h.base_url + "/authorize/" + secrets.token_urlsafe(32)

        async def status(client: str) -> int:
            headers = {"X-Forwarded-For": f"198.51.100.7, {client}"}
            async with h.http.get(guess, headers=headers) as resp:
                return resp.status

        assert [await status("203.0.113.1") for _ in range(3)] == [404, 404, 429]
        assert await status("203.0.113.2") == 404  # another customer is not locked out
    finally:
        await stop_harness(h)


# -- what the pages tell the owner (issue 7 §2) ----------------------------------


async def page_of(h: Harness, method: str, path: str) -> tuple[int, str]:
    async with h.http.request(method, h.base_url + path) as resp:
        return resp.status, await resp.text()


async def test_the_page_names_the_account_the_service_and_the_first_lines(desk: Harness) -> None:
    """What a spoofed request would make the owner authorize, before the click."""
    body = "Dzień dobry,\nproszę zmienić hasło skrzynki biuro@acme.test.\nPozdrawiam\n"
    await desk.send(sender="mail-admin@partner.test", subject="Hasło do poczty", body=body)
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == ["mail-admin@partner.test"])
    status, page = await page_of(desk, "GET", link_in(auth))
    assert status == 200
    for shown in ("ACME sp. z o.o.", "Poczta", "mail-admin@partner.test", "Hasło do poczty"):
        assert shown in page, shown
    assert "proszę zmienić hasło skrzynki biuro@acme.test." in page
    assert "Pozdrawiam" in page
    status, page = await page_of(desk, "POST", link_in(auth))
    assert status == 200 and "ACME sp. z o.o." in page and "Poczta" in page


async def test_an_account_level_ticket_says_no_service_is_named(desk: Harness) -> None:
    path = await new_link(desk)
    status, page = await page_of(desk, "GET", path)
    assert status == 200 and "ACME sp. z o.o." in page
    assert "całe konto (bez wskazanej usługi)" in page


async def test_the_first_lines_are_escaped(desk: Harness) -> None:
    body = '<script>alert(1)</script>\n<img src=x onerror=alert(2)> "x" & y\n'
    await desk.send(body=body)
    await desk.drain()
    [auth] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    status, page = await page_of(desk, "GET", link_in(auth))
    assert status == 200
    assert "<script>alert(1)" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt; &#34;x&#34; &amp; y" in page


async def test_the_used_page_names_the_ticket(desk: Harness) -> None:
    path = await new_link(desk, subject="Faktura za listopad")
    assert (await page_of(desk, "POST", path))[0] == 200
    for method in ("GET", "POST"):
        status, page = await page_of(desk, method, path)
        assert status == 410
        assert "1000" in page and "jest już potwierdzone" in page
        # a spent copy (a forward, an auto-reply) names the ticket, nothing written in it
        assert "Faktura za listopad" not in page and OWNER not in page


async def test_a_link_spent_without_confirming_does_not_claim_the_ticket_is_confirmed(
    desk: Harness,
) -> None:
    path = await new_link(desk, subject="Nowy link")
    async with desk.db.transaction() as session:  # what a newer link or a bounce does
        await session.execute(update(AuthToken).values(used_at=desk.clock.now()))
    status, page = await page_of(desk, "GET", path)
    assert status == 410 and "1000" in page and "Nowy link" not in page
    assert "nie zostało nim potwierdzone" in page
    assert "jest już potwierdzone" not in page


async def test_a_sender_who_lost_the_right_to_act_is_told_so_not_expired(desk: Harness) -> None:
    from iqmaild.storage.directory import revoke_share

    await desk.send(sender="mail-admin@partner.test", subject="Skrzynka pełna")
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == ["mail-admin@partner.test"])
    async with desk.db.transaction() as session:
        await revoke_share(session, "acme-mail", "mail-admin@partner.test")
    for method in ("GET", "POST"):
        status, page = await page_of(desk, method, link_in(auth))
        assert status == 410
        assert "Brak uprawnień do potwierdzenia" in page, page
        assert "1000" in page and "mail-admin@partner.test" not in page
        assert "wygasł" not in page and "minęła" not in page
        # It names the ticket, never what the sender may no longer see.
        assert "ACME sp. z o.o." not in page and "nie działa poczta" not in page
    assert (await desk.ticket(1000)).authorization == "pending"


async def test_english_pages_for_an_english_account(desk: Harness) -> None:
    await desk.send(
        sender="boss@beta.test", subject="Server down", body="Hello,\nthe VPS is down.\n"
    )
    await desk.drain()
    auth = next(m for m in desk.new_mail() if m.envelope_to == ["boss@beta.test"])
    status, page = await page_of(desk, "GET", link_in(auth))
    assert status == 200 and '<html lang="en">' in page
    assert "Beta Ltd" in page and "the VPS is down." in page and "Confirm ticket" in page
    status, page = await page_of(desk, "POST", link_in(auth))
    assert status == 200 and "Ticket confirmed" in page and "Beta Ltd" in page
    status, page = await page_of(desk, "GET", link_in(auth))
    assert status == 410 and "is already confirmed" in page and "Server down" not in page
