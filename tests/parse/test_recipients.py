"""Recipients the parser cannot read whole count as unshared (issue 5, item 5).

Each shape used to drop the outsider from the recipient list, so the owner's
reply with the ticket's code and an outsider in Cc was authorized. Now each is
``unshared_cc`` and, since the outsider saw the code, the ticket gets a new one.
"""

from __future__ import annotations

import pytest

from tests.harness import DESK, Harness

OWNER = "owner@acme.test"
OUTSIDER = "outsider@evil.test"


def _shapes() -> dict[str, str]:
    """Header lines (after From/To) that hide an outsider from a naive parser."""
    filler = ", ".join("dev@partner.test" for _ in range(7000))  # a shared contact, 7000x
    many = ", ".join(f"u{i}@acme.test" for i in range(5001))
    return {
        "plain-cc": f"Cc: {OUTSIDER}\r\n",
        "after-64kb-of-cc": f"Cc: {filler}, {OUTSIDER}\r\n",
        "after-5000-addresses": f"Cc: {many}, {OUTSIDER}\r\n",
        "idna2008-domain": "Cc: jan@fußball.test\r\n",
        "fullwidth-domain": "Cc: outsider@ｅｖｉｌ.test\r\n",
        "nul-suffixed": f"Cc: {OUTSIDER}\x00\r\n",
        "obsolete-space-before-colon": f"Cc : {OUTSIDER}\r\n",
        "unterminated-angle": f"Cc: Outsider <{OUTSIDER}\r\n",
        "second-cc-header": f"Cc: dev@partner.test\r\nCc: {OUTSIDER}\r\n",
        "folded-cc": f"Cc: dev@partner.test,\r\n {OUTSIDER}\r\n",
        "stray-line-before-cc": f"X-Junk\r\nCc: {OUTSIDER}\r\n",
    }


SHAPES = _shapes()


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
async def test_a_recipient_the_parser_cannot_drop(desk: Harness, shape: str) -> None:
    number = await desk.authorized_ticket()
    old_tag = await desk.tag(number)

    def message(recipients: str, ident: str) -> bytes:
        return (
            f"From: {OWNER}\r\nTo: {DESK}\r\n{recipients}Subject: Re: {old_tag} Hasło\r\n"
            f"Message-ID: <{ident}@client.test>\r\n\r\nProszę o nowe hasło.\r\n"
        ).encode()

    assert (await desk.send_raw(message(SHAPES[shape], shape)))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.reasons) == ("unauthorized", ["unshared_cc"]), row.reasons
    # The outsider saw the code: it no longer works, and the owner has the new one.
    new_tag = await desk.tag(number)
    assert new_tag != old_tag
    [notice] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    assert new_tag in str(notice["Subject"]) and old_tag not in notice.as_string()
    assert (await desk.send_raw(message("", f"again-{shape}")))[0] == 250
    await desk.drain()
    assert (await desk.last_message()).reasons == ["code_mismatch"]


async def test_obsolete_syntax_that_loses_no_address_is_fine(desk: Harness) -> None:
    number = await desk.authorized_ticket()
    raw = (
        f"From: {OWNER}\r\nTo: {DESK}, , \r\nCc: dev@partner.test,,\r\n"
        f"Subject: Re: {await desk.tag(number)} x\r\nMessage-ID: <obs@client.test>\r\n\r\nx\r\n"
    ).encode()
    assert (await desk.send_raw(raw))[0] == 250
    await desk.drain()
    assert (await desk.last_message()).decision == "authorized"


async def test_a_utf8_local_part_is_an_address(desk: Harness) -> None:
    """RFC 6531: łukasz@acme.test can be a directory entry like any other."""
    async with desk.db.transaction() as session:
        from iqmaild.storage.directory import grant_share

        await grant_share(session, "acme-www", "łukasz@acme.test")
    raw = (
        "From: Łukasz <łukasz@acme.test>\r\nTo: bok@desk.test\r\nSubject: Strona\r\n"
        "Message-ID: <utf8@client.test>\r\n\r\nx\r\n"
    ).encode()
    assert (await desk.send_raw(raw, mail_from="łukasz@acme.test"))[0] == 250
    await desk.drain()
    row = await desk.last_message()
    assert (row.decision, row.sender_role, row.from_address) == (
        "pending",
        "shared",
        "łukasz@acme.test",
    )
    [link] = [m for m in desk.new_mail() if m.envelope_to == ["łukasz@acme.test"]]
    assert "/authorize/" in link.as_string() and "łukasz@acme.test" in str(link["To"])


async def test_an_ignored_message_that_leaks_the_code_replaces_it(desk: Harness) -> None:
    """An auto-generated mail is ignored, but if it carried the code past an outsider the
    code is gone all the same: the outsider forging the owner with it gets nowhere."""
    number = await desk.authorized_ticket()
    old_tag = await desk.tag(number)
    await desk.send(
        subject=f"Re: {old_tag} przypomnienie",
        cc=[OUTSIDER],
        headers={"Auto-Submitted": "auto-generated"},
    )
    await desk.drain()
    assert (await desk.last_message()).decision == "ignored"
    new_tag = await desk.tag(number)
    assert new_tag != old_tag
    [changed] = [m for m in desk.new_mail() if m.envelope_to == [OWNER]]
    assert new_tag in str(changed["Subject"])
    await desk.send(subject=f"Re: {old_tag} proszę zmienić hasło", mail_from=OUTSIDER)
    await desk.drain()
    assert (await desk.last_message()).reasons == ["code_mismatch"]


async def test_a_cc_to_the_desks_own_sub_address_is_no_outsider(desk: Harness) -> None:
    number = await desk.authorized_ticket()
    await desk.send(subject=f"Re: {await desk.tag(number)} x", cc=["bok+faktury@desk.test"])
    await desk.drain()
    assert (await desk.last_message()).decision == "authorized"
