"""Screenshots of the authorization pages, as customers see them.

Run from the repository root, with the test extras installed and Debian's
Chromium at /usr/bin/chromium (Playwright drives it; no browser download):

    python docs/screenshots/make.py

It starts the daemon in-process (SQLite in a temporary directory, the test
directory of accounts, outbound mail captured), mails the desk as a Polish and
an English customer, opens each link in headless Chromium, and saves the
confirmation page (GET) and the success page (after pressing the button), at
desktop width and 400 px wide, and the page of the link opened once more
(used, 400 px), as PNG files beside this script.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests.harness, from a checkout

from playwright.async_api import async_playwright  # noqa: E402

from tests.e2e.conftest import CHROMIUM_ARGS  # noqa: E402
from tests.harness import link_in, start_harness, stop_harness  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
WIDTHS = {"desktop": 1280, "400px": 400}
CUSTOMERS = {
    "pl": (
        "mail-admin@partner.test",  # a shared contact of ACME's mail service
        "Zmiana hasła do skrzynki biuro@acme.test",
        "Dzień dobry,\n\nproszę o zmianę hasła do skrzynki biuro@acme.test – poprzednie "
        "mogło wyciec. Nowe hasło proszę przekazać telefonicznie.\n\n"
        "Z poważaniem\nAnna Nowak\nPartner IT\n",
    ),
    "en": (
        "boss@beta.test",  # the primary address of Beta Ltd (English)
        "Please restart the VPS",
        "Hello,\n\nour VPS has not answered since 9:40 this morning. Could you restart "
        "it and tell us what happened?\n\nBest regards\nJohn Smith\nBeta Ltd\n",
    ),
}


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="iqmaild-shots-") as tmp:
        desk = await start_harness(Path(tmp))
        try:
            links = {}
            for lang, (sender, subject, body) in CUSTOMERS.items():
                await desk.send(sender=sender, subject=subject, body=body)
                await desk.drain()
                [auth] = [m for m in desk.new_mail() if m.envelope_to == [sender]]
                links[lang] = desk.base_url + link_in(auth)
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(
                    executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
                )
                try:
                    for lang, url in links.items():
                        await shoot(browser, lang, url)
                finally:
                    await browser.close()
        finally:
            await stop_harness(desk)


async def shoot(browser: object, lang: str, url: str) -> None:
    """The confirmation page at each width, then the success page at each width."""
    pages = {}
    for name, width in WIDTHS.items():
        page = await browser.new_page(viewport={"width": width, "height": 720})  # type: ignore[attr-defined]
        response = await page.goto(url)
        assert response is not None and response.status == 200, response
        await save(page, f"authorize-{lang}-{name}.png")
        pages[name] = page
    # One click authorizes; the other width shows the same success page, reloaded
    # from the POST's answer rather than posted twice (a second POST is "used").
    first, *others = WIDTHS
    async with pages[first].expect_navigation():
        await pages[first].locator("form[method=post] button[type=submit]").click()
    html = await pages[first].content()
    await save(pages[first], f"confirmed-{lang}-{first}.png")
    for name in others:
        await pages[name].set_content(html)
        await save(pages[name], f"confirmed-{lang}-{name}.png")
    # The link once more: the "used" page names the ticket (410).
    response = await pages[others[-1]].goto(url)
    assert response is not None and response.status == 410, response
    await save(pages[others[-1]], f"used-{lang}-{others[-1]}.png")
    for page in pages.values():
        await page.close()


async def save(page: object, name: str) -> None:
    await page.screenshot(path=str(HERE / name), full_page=True)  # type: ignore[attr-defined]
    print(HERE / name)


if __name__ == "__main__":
    asyncio.run(main())
