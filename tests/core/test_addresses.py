"""Normalization of mailbox addresses (DESIGN.md, "The authorization rules": Inputs)."""

from __future__ import annotations

import pytest

from iqmaild.core.addresses import domain_of, local_part, normalize

ZAZOLC = "xn--za-6ja4f8n1l.pl"  # zażółć.pl


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("owner@acme.test", "owner@acme.test"),
        ("Owner@ACME.Test", "owner@acme.test"),  # local part too: compared case-insensitively
        ("OWNER@acme.test", "owner@acme.test"),
        ("<owner@acme.test>", "owner@acme.test"),
        ("  < owner@acme.test >  ", "owner@acme.test"),
        ("owner@acme.test.", "owner@acme.test"),  # trailing dot of a fully qualified name
        ("owner@ACME.TEST.", "owner@acme.test"),
        ("jan@zażółć.pl", f"jan@{ZAZOLC}"),
        ("jan@ZAŻÓŁĆ.PL", f"jan@{ZAZOLC}"),
        ("jan@zażółć.pl.", f"jan@{ZAZOLC}"),
        (f"jan@{ZAZOLC}", f"jan@{ZAZOLC}"),  # A-label as sent: unchanged
        (f"jan@{ZAZOLC.upper()}", f"jan@{ZAZOLC}"),
        ("jan@zaz\u0307o\u0301ł\u0107.pl", f"jan@{ZAZOLC}"),  # decomposed (NFD) form
        ("Żółw@x.pl", "żółw@x.pl"),  # UTF-8 local part (SMTPUTF8) kept, lowercased
        ('"a@b"@c.test', '"a@b"@c.test'),  # quoted local part may hold "@"
        ("first.last+tag@sub.acme.test", "first.last+tag@sub.acme.test"),
        ("łukasz@acme.test", "łukasz@acme.test"),  # RFC 6531 local part
        ("x@under_score.test", "x@under_score.test"),  # real MX hosts have them
        ("x@[192.0.2.1]", "x@[192.0.2.1]"),  # a domain literal
        # IDNA 2008 (UTS #46, non-transitional): what resolvers and MTAs look up
        ("owner@faß.de", "owner@xn--fa-hia.de"),  # IDNA 2003 made it fass.de: another domain
        ("dev@fußball.test", "dev@xn--fuball-cta.test"),
        ("owner@ＡＣＭＥ.test", "owner@acme.test"),  # full-width maps: the same domain
        ("owner@acme\u3002test", "owner@acme.test"),  # ideographic full stop
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "<>",
        "owner",  # no @
        "owner.acme.test",
        "@acme.test",  # empty local part
        "owner@",  # empty domain
        "owner@.",
        "@",
        "owner @acme.test",  # spaces
        "owner@acme .test",
        "own er@acme.test",
        "owner@acme\t.test",
        "owner@acme.test\u00a0x",  # no-break space
        "owner@acme\x00.test",  # controls
        "owner\r\n@acme.test",
        "owner@acme.test\x1b",
        "own\x7fer@acme.test",
        "owner@acme..test",  # empty label
        "owner@.acme.test",
        "owner@@acme.test",  # unquoted @ in the local part
        "owner@evil.test@acme.test",
        "owner@xn--zz.test",  # not a valid A-label
        "owner@-acme.test",  # a label starting with a hyphen
        "owner@acme\u200d.test",  # a joiner where IDNA 2008 allows none
        "x@fu\u00dfball\u2044.test",  # a character IDNA 2008 disallows
        # a non-ASCII local part that case folding or NFC would turn into ASCII:
        # another mailbox at the server, but equal to a directory address
        "\u212aowalski@acme.test",  # KELVIN SIGN lowercases to "k"
        "ow\u037ener@acme.test",  # GREEK QUESTION MARK is ";" in NFC
        "\u0142ukasz\u212a@acme.test",  # also beside other non-ASCII letters
    ],
)
def test_not_an_address(raw: str) -> None:
    assert normalize(raw) is None


def test_normalize_is_idempotent() -> None:
    for raw in ("Owner@ACME.Test.", "jan@ZAŻÓŁĆ.PL", '"A@B"@C.test', "Żółw@x.pl"):
        once = normalize(raw)
        assert once is not None
        assert normalize(once) == once


def test_domain_and_local_part() -> None:
    assert domain_of("owner@acme.test") == "acme.test"
    assert local_part("owner@acme.test") == "owner"
    assert domain_of('"a@b"@c.test') == "c.test"
    assert local_part('"a@b"@c.test') == '"a@b"'
