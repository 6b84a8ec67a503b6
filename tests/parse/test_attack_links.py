"""Attack pass on the link scan (issue 6 rebuilt it to decode only base64 parts
found by one regex): a copy of an authorization link that comes back to the desk
must spend the link in every form a mail client or a browser can open it.

The story each test plays: a forger writes as the owner; the link mail goes to
the owner, who forwards it to the desk ("did you send this?"). The forward now
sits in the staff mailbox, where one click on the copy would authorize the
forger's request; so the copy must burn the link, however the owner's client
(or a link scanner, or an MTA) encoded it.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

import pytest

from tests.harness import DESK, Harness, link_in

OWNER = "owner@acme.test"
HEAD = f"From: {OWNER}\r\nTo: {DESK}\r\nSubject: Fwd: co to jest?\r\nMIME-Version: 1.0\r\n"


def _b64(data: bytes, width: int = 76) -> str:
    text = base64.b64encode(data).decode()
    return "\r\n".join(text[i : i + width] for i in range(0, len(text), width))


def _qp_escaped(url: str) -> str:
    """Quoted-printable that escapes letters too (legal; some encoders do), with a
    soft break inside the token."""
    escaped = "".join(f"={ord(c):02X}" if c in "/:aeiouAEIOU" else c for c in url)
    return escaped[:40] + "=\r\n" + escaped[40:]


def _single(cte_header: str, body: str, ctype: str = "text/plain; charset=utf-8") -> Callable:
    def build(url: str, ident: str) -> bytes:
        return (
            f"{HEAD}Message-ID: <{ident}@client.test>\r\nContent-Type: {ctype}\r\n"
            f"{cte_header}\r\n\r\n" + body.format(url=url)
        ).encode("latin-1")

    return build


def _shape(fn: Callable[[str], tuple[str, str]]) -> Callable:
    def build(url: str, ident: str) -> bytes:
        headers, body = fn(url)
        raw = f"{HEAD}Message-ID: <{ident}@client.test>\r\n{headers}\r\n\r\n{body}"
        return raw.encode("latin-1")

    return build


def _attached(ctype: str, payload: str, cte: str = "base64") -> Callable[[str], tuple[str, str]]:
    def fn(url: str) -> tuple[str, str]:
        inner = f"From: {DESK}\r\nSubject: Potwierdz\r\n\r\nOtworz: {url}\r\n".encode()
        encoded = _b64(inner) if cte == "base64" else payload
        return (
            'Content-Type: multipart/mixed; boundary="B"',
            f"--B\r\nContent-Type: text/plain\r\n\r\nZobaczcie zalacznik.\r\n"
            f"--B\r\nContent-Type: {ctype}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
            f"{encoded}\r\n--B--\r\n",
        )

    return fn


SHAPES: dict[str, Callable] = {
    "base64-cte-folded": lambda url, ident: _single(
        "Content-Transfer-Encoding:\r\n base64", _b64(url.encode())
    )(url, ident),
    "base64-cte-with-comment": lambda url, ident: _single(
        "Content-Transfer-Encoding: (MIME) base64", _b64(url.encode())
    )(url, ident),
    "base64-cte-after-bare-cr": lambda url, ident: _single(
        "X-Client: x\rContent-Transfer-Encoding: base64", _b64(url.encode())
    )(url, ident),
    "base64-cte-encoded-word": lambda url, ident: _single(
        "Content-Transfer-Encoding: =?us-ascii?b?YmFzZTY0?=", _b64(url.encode())
    )(url, ident),
    "qp-escaped-letters-and-soft-break": lambda url, ident: _single(
        "Content-Transfer-Encoding: quoted-printable", _qp_escaped(url)
    )(url, ident),
    "qp-soft-break-with-trailing-blanks": lambda url, ident: _single(
        "Content-Transfer-Encoding: quoted-printable", url[:45] + "=  \r\n" + url[45:]
    )(url, ident),
    "utf16-base64": lambda url, ident: _single(
        "Content-Transfer-Encoding: base64",
        _b64(url.encode("utf-16")),
        "text/plain; charset=utf-16",
    )(url, ident),
    "html-entities": lambda url, ident: _single(
        "Content-Transfer-Encoding: 8bit",
        '<a href="'
        + url.replace("/", "&#x2F;")[:-10]
        + "".join(f"&#{ord(c)};" for c in url[-10:])
        + '">potwierdz</a>',
        "text/html; charset=utf-8",
    )(url, ident),
    "safelinks-wrapped": lambda url, ident: _single(
        "Content-Transfer-Encoding: 7bit",
        "https://eur01.safelinks.protection.outlook.com/?url="
        + url.replace(":", "%3A").replace("/", "%2F")
        + "&data=05%7C02&reserved=0",
    )(url, ident),
    "percent-escaped-token": lambda url, ident: _single(
        "Content-Transfer-Encoding: 7bit", url[:-5] + "".join(f"%{ord(c):02X}" for c in url[-5:])
    )(url, ident),
    "scheme-and-host-in-capitals": lambda url, ident: _single(
        "Content-Transfer-Encoding: 7bit",
        re.sub(r"^http://127\.0\.0\.1", "HTTP://127.0.0.1", url),
    )(url, ident),
    "attached-as-octet-stream": _shape(_attached("application/octet-stream", "")),
    "attached-rfc822-encoded-base64": _shape(_attached("message/rfc822", "")),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
async def test_a_forwarded_link_is_spent_however_it_is_encoded(desk: Harness, shape: str) -> None:
    await desk.send(subject="Zmiana hasla do poczty")  # the forger, as the owner
    await desk.drain()
    [link_mail] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    path = link_in(link_mail)
    url = "http://127.0.0.1:8026" + path
    async with desk.http.get(desk.base_url + path) as resp:
        assert resp.status == 200  # the link works until its copy comes back
    if shape == "percent-escaped-token":  # and so does this form of it (a copy indeed)
        escaped = url[len("http://127.0.0.1:8026") : -5] + "".join(
            f"%{ord(c):02X}" for c in url[-5:]
        )
        async with desk.http.get(desk.base_url + escaped) as resp:
            assert resp.status == 200 and "<form" in await resp.text()
    raw = SHAPES[shape](url, shape)
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    async with desk.http.get(desk.base_url + path) as resp:
        assert resp.status == 410, f"{shape}: the copy in the staff mailbox still works"


async def test_text_a_forger_wrote_cannot_crowd_the_real_link_out(desk: Harness) -> None:
    """The scan kept the first 20 distinct links it saw: a forward of a thread with
    more links before ours (fakes a forger wrote, quoted by the link mail's own
    Subject and body) left the real one unspent."""
    await desk.send(subject="Zmiana hasla")
    await desk.drain()
    [link_mail] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    path = link_in(link_mail)
    fakes = " ".join(
        f"http://127.0.0.1:8026/authorize/{binascii.hexlify(bytes([i]) * 10).decode()}"
        for i in range(30)
    )
    raw = (
        f"{HEAD}Message-ID: <crowd@client.test>\r\n\r\n> {fakes}\r\n>\r\n"
        f"> http://127.0.0.1:8026{path}\r\n"
    ).encode()
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    async with desk.http.get(desk.base_url + path) as resp:
        assert resp.status == 410
