"""Signed ticket references in our Message-IDs (DESIGN.md, "The ticket tag")."""

from __future__ import annotations

import re

import pytest

from iqmaild.core.threadref import find_ticket_reference, is_ours, make_message_id

KEY = b"k" * 32
DOMAIN = "desk.test"


def _mid(number: int | None, unique: str = "0123456789abcdef") -> str:
    return make_message_id(KEY, number, unique, DOMAIN)


def test_round_trip() -> None:
    mid = _mid(23328)
    assert re.fullmatch(r"<iq\.23328\.0123456789abcdef\.[0-9a-f]{16}@desk\.test>", mid)
    assert find_ticket_reference(KEY, DOMAIN, mid) == 23328
    assert find_ticket_reference(KEY, DOMAIN, "", f"<other@x.test> {mid} <more@y.test>") == 23328


def test_survives_case_changes_of_the_whole_id() -> None:
    mid = _mid(7)
    assert find_ticket_reference(KEY, "DESK.TEST", mid.upper()) == 7


def test_unique_with_uppercase_is_signed_as_found() -> None:
    mid = make_message_id(KEY, 7, "ABCdef123456", DOMAIN)
    assert find_ticket_reference(KEY, DOMAIN, mid) == 7


@pytest.mark.parametrize("unique", ["abc", "a" * 41, "abc-def-ghi", "abc_def_ghi", "zaż0łć1234"])
def test_a_unique_the_finder_cannot_read_is_refused(unique: str) -> None:
    with pytest.raises(ValueError):
        make_message_id(KEY, 7, unique, DOMAIN)
    with pytest.raises(ValueError):
        make_message_id(KEY, None, unique, DOMAIN)


def test_forged_signature_rejected() -> None:
    mid = _mid(7)
    sig = mid.split(".")[3].split("@")[0]
    forged = mid.replace(sig, "0" * 16)
    assert find_ticket_reference(KEY, DOMAIN, forged) is None
    assert find_ticket_reference(b"other-key", DOMAIN, mid) is None


def test_wrong_number_rejected() -> None:
    mid = _mid(7)
    assert find_ticket_reference(KEY, DOMAIN, mid.replace("<iq.7.", "<iq.8.")) is None


def test_other_unique_with_same_signature_rejected() -> None:
    mid = _mid(7, "aaaaaaaaaaaa")
    assert find_ticket_reference(KEY, DOMAIN, mid.replace("aaaaaaaaaaaa", "aaaaaaaaaaab")) is None


def test_wrong_domain_rejected() -> None:
    mid = make_message_id(KEY, 7, "0123456789abcdef", "attacker.test")
    assert find_ticket_reference(KEY, DOMAIN, mid) is None
    assert (
        find_ticket_reference(KEY, DOMAIN, _mid(7).replace("@desk.test", "@desk.test.evil")) is None
    )


def test_newest_reference_wins() -> None:
    old, new = _mid(1, "aaaaaaaaaaaa"), _mid(2, "bbbbbbbbbbbb")
    # In-Reply-To (given first) beats References
    assert find_ticket_reference(KEY, DOMAIN, new, f"{old}") == 2
    assert find_ticket_reference(KEY, DOMAIN, old, f"{new}") == 1
    # within References the last id is the newest
    assert find_ticket_reference(KEY, DOMAIN, "", f"{old} {new}") == 2
    assert find_ticket_reference(KEY, DOMAIN, "", f"{new}\r\n {old}") == 1
    # an invalid newer reference does not hide a valid older one
    forged = _mid(3, "cccccccccccc").replace("<iq.3.", "<iq.4.")
    assert find_ticket_reference(KEY, DOMAIN, forged, f"{old} {forged}") == 1


def test_ids_without_ticket_number() -> None:
    """Mail that must not thread with a ticket (a refusal) names none, but is still ours."""
    bare = _mid(None)
    assert re.fullmatch(r"<iq\.0\.0123456789abcdef\.[0-9a-f]{16}@desk\.test>", bare)
    assert find_ticket_reference(KEY, DOMAIN, bare) is None
    assert is_ours(KEY, DOMAIN, bare) and is_ours(KEY, DOMAIN, _mid(7))
    assert not is_ours(KEY, DOMAIN, bare.replace("<iq.0.", "<iq.1."))
    assert not is_ours(b"other-key", DOMAIN, bare)
    assert not is_ours(KEY, DOMAIN, "<CAF=abc@mail.gmail.com>")
    assert find_ticket_reference(KEY, DOMAIN, "", "<CAF=abc@mail.gmail.com> <x@y>") is None
    assert find_ticket_reference(KEY, DOMAIN) is None
    assert find_ticket_reference(KEY, DOMAIN, "", "") is None


def test_refuses_negative_numbers() -> None:
    with pytest.raises(ValueError):
        make_message_id(KEY, -1, "0123456789abcdef", DOMAIN)
