"""The ticket tag ``[PREFIX#NUMBER:CODE]`` (DESIGN.md, "The ticket tag")."""

from __future__ import annotations

import re

import pytest

from iqmaild.core.tag import (
    CODE_HEX_DIGITS,
    TagFormat,
    TagMatch,
    code_matches,
    derive_code,
    strip_reply_prefixes,
)

TAGS = TagFormat("IQ.pl")
CODE = "1be837cbaa33d1c9254c"  # the example from the source document
KEY = b"k" * 32


def test_full_and_short_format() -> None:
    assert TAGS.full(23328, CODE) == "[IQ.pl#23328:1be837cbaa33d1c9254c]"
    assert TAGS.short(23328) == "[IQ.pl#23328]"
    assert TagFormat("BOK").full(7, CODE) == f"[BOK#7:{CODE}]"


def test_find_the_documents_example() -> None:
    assert TAGS.find("[IQ.pl#23328:1be837cbaa33d1c9254c]") == TagMatch(23328, CODE)


@pytest.mark.parametrize(
    "subject",
    [
        f"Re: [IQ.pl#23328:{CODE}] Problem z pocztą",
        f"RE: [IQ.pl#23328:{CODE}] Problem z pocztą",
        f"Fwd: [IQ.pl#23328:{CODE}] Problem",
        f"AW: WG: [IQ.pl#23328:{CODE}] Problem",
        f"Odp: Odp: Re: [IQ.pl#23328:{CODE}] Problem",
        f"SV: [IQ.pl#23328:{CODE}]",
        f"TR: [IQ.pl#23328:{CODE}]",
        f"Re[3]: [IQ.pl#23328:{CODE}] Problem",
        f"Problem z pocztą [IQ.pl#23328:{CODE}]",
        f"  Re:   Fwd:  [IQ.pl#23328:{CODE}]  Problem ",
        f"Re: [iq.PL#23328:{CODE}] prefix case",
        f"Re: [IQ.PL#23328:{CODE.upper()}] hex case",
        f"Re: [ IQ.pl # 23328 : {CODE} ] spaces",
        f"Re: [IQ.pl#023328:{CODE}] leading zero",
    ],
)
def test_find_behind_prefixes_case_and_spaces(subject: str) -> None:
    assert TAGS.find(subject) == TagMatch(23328, CODE)


def test_find_without_code() -> None:
    assert TAGS.find("Re: [IQ.pl#23328] Problem") == TagMatch(23328, None)
    assert TAGS.find("Re: [IQ.pl#23328 ] Problem") == TagMatch(23328, None)


@pytest.mark.parametrize(
    ("subject", "code"),
    [
        ("[IQ.pl#5:]", ""),  # empty
        ("[IQ.pl#5:1be8]", "1be8"),  # short
        ("[IQ.pl#5:" + CODE * 2 + "]", CODE * 2),  # long
        ("[IQ.pl#5:zzzzzzzzzzzzzzzzzzzz]", "z" * 20),  # non-hex: a wrong code, not no tag
        ("[IQ.pl#5:1BE837CBAA33D1C9254G]", "1be837cbaa33d1c9254g"),
    ],
)
def test_malformed_code_is_a_code_that_never_matches(subject: str, code: str) -> None:
    found = TAGS.find(subject)
    assert found == TagMatch(5, code)
    assert not code_matches(derive_code(KEY, 5, b"n"), found.code)


def test_several_tags_first_wins() -> None:
    found = TAGS.find(f"Re: [IQ.pl#11:{CODE}] was [IQ.pl#22:{'0' * 20}]")
    assert found == TagMatch(11, CODE)
    assert TAGS.find(f"[IQ.pl#11] and [IQ.pl#22:{CODE}]") == TagMatch(11, None)


def test_a_zero_number_is_not_a_tag_but_a_later_tag_counts() -> None:
    assert TAGS.find(f"[IQ.pl#0:{CODE}]") is None
    assert TAGS.find(f"[IQ.pl#000:{CODE}] [IQ.pl#7:{CODE}]") == TagMatch(7, CODE)


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "Problem z pocztą",
        f"[BOK#23328:{CODE}]",  # other helpdesk's prefix
        f"[IQ.plx#23328:{CODE}]",
        f"[XIQ.pl#23328:{CODE}]",
        f"[IQxpl#23328:{CODE}]",  # the dot is literal
        f"IQ.pl#23328:{CODE}",  # no brackets
        f"[IQ.pl#:{CODE}]",  # no number
        f"[IQ.pl#-5:{CODE}]",
        f"[IQ.pl#12a:{CODE}]",
        f"[IQ.pl#{'1' * 19}:{CODE}]",  # more digits than any ticket number
        "[IQ.pl#١٢٣:" + CODE + "]",  # non-ASCII digits
        "[IQ.pl#１２３:" + CODE + "]",  # full-width digits
        "[IQ.pl#5:abc def]",
    ],
)
def test_not_a_tag(subject: str) -> None:
    assert TAGS.find(subject) is None


def test_prefix_is_matched_literally_and_configurable() -> None:
    bok = TagFormat("BOK")
    assert bok.find(f"Re: [bok#9:{CODE}]") == TagMatch(9, CODE)
    assert bok.find(f"Re: [IQ.pl#9:{CODE}]") is None
    special = TagFormat("a+b(c)")
    assert special.find(f"[A+B(C)#3:{CODE}]") == TagMatch(3, CODE)
    assert special.find(f"[aab(c)#3:{CODE}]") is None


@pytest.mark.parametrize(
    ("subject", "text"),
    [
        (f"Re: [IQ.pl#23328:{CODE}] Problem z pocztą", "Problem z pocztą"),
        (f"RE: Odp: AW: Fwd: [IQ.pl#23328:{CODE}] Problem", "Problem"),
        (f"Problem [IQ.pl#23328:{CODE}]", "Problem"),
        (f"[IQ.pl#23328:{CODE}] Re: Problem", "Problem"),
        ("Re: [IQ.pl#23328] Problem", "Problem"),
        (f"Re: [IQ.pl#1:{CODE}] Re: [IQ.pl#1:{CODE}] Problem", "Problem"),
        ("SV: WG: TR: Problem   z \t pocztą", "Problem z pocztą"),
        (f"[BOK#5:{CODE}] Re: Problem", f"[BOK#5:{CODE}] Re: Problem"),
        ("Problem: Re: in the text", "Problem: Re: in the text"),
        ("", ""),
    ],
)
def test_strip_removes_tags_and_prefixes_and_keeps_the_text(subject: str, text: str) -> None:
    assert TAGS.strip(subject) == text


def test_strip_then_full_tag_carries_it_once() -> None:
    subject = f"Re: Re: [IQ.pl#5:{CODE}] Problem"
    outbound = f"{TAGS.full(5, CODE)} {TAGS.strip(subject)}"
    assert outbound == f"[IQ.pl#5:{CODE}] Problem"
    assert len(re.findall(r"\[IQ\.pl#", outbound)) == 1
    assert TAGS.find(outbound) == TagMatch(5, CODE)


def test_strip_reply_prefixes() -> None:
    assert strip_reply_prefixes("Re: AW: Odp: Problem ") == "Problem"
    assert strip_reply_prefixes("Problem") == "Problem"


def test_derive_code_is_20_lowercase_hex_and_deterministic() -> None:
    code = derive_code(KEY, 23328, b"nonce")
    assert len(code) == CODE_HEX_DIGITS == 20
    assert re.fullmatch(r"[0-9a-f]{20}", code)
    assert derive_code(KEY, 23328, b"nonce") == code


def test_derive_code_differs_per_nonce_key_and_number() -> None:
    base = derive_code(KEY, 23328, b"nonce")
    assert derive_code(KEY, 23328, b"nonce2") != base
    assert derive_code(b"x" * 32, 23328, b"nonce") != base
    assert derive_code(KEY, 23329, b"nonce") != base
    # number and nonce are separated: (1, b"23") is not (12, b"3")
    assert derive_code(KEY, 1, b"23") != derive_code(KEY, 12, b"3")


def test_code_matches() -> None:
    code = derive_code(KEY, 1, b"n")
    assert code_matches(code, code)
    assert code_matches(code, code.upper())
    assert not code_matches(code, None)
    assert not code_matches(code, "")
    assert not code_matches(code, code[:-1])
    assert not code_matches(code, code + "0")
    assert not code_matches(code, "0" * 20)
    assert not code_matches(code, code[:-1] + "ż")  # non-ASCII never raises
