"""The key ring (README, "Rotating the secret key"): the current key signs, the ring verifies.

The vectors below were made by the code before key rings existed: a bare
``secret_key`` (the ring of one, key id 0) must keep signing them byte for byte,
or every code and Message-ID already mailed would stop working at the upgrade.
"""

from __future__ import annotations

import pytest

from iqmaild.core import loopmark, threadref, verp
from iqmaild.core.keys import KeyRing, any_equal
from iqmaild.core.tag import accepted_codes, code_matches, derive_code

OLD = b"legacy-secret-key-0123456789abcdef!"
NEW = b"rotated-secret-key-after-a-leak-0123456789"
NONCE = bytes(range(16))
UNIQUE = "a0123456789abcdef"

LEGACY_CODE = "9cd0f5ee34c5d68bb3a6"
LEGACY_MSGID = "<iq.23328.a0123456789abcdef.501a53961f84096e@desk.test>"
LEGACY_VERP = "bok+bounce-4711-5ca2c7617649@desk.test"
LEGACY_MARK = "0123456789abcdef.bd47e2fa11843e58"

ROTATED = KeyRing(((1, NEW), (0, OLD)))
DROPPED = KeyRing(((1, NEW),))


@pytest.mark.parametrize("key", [OLD, KeyRing(((0, OLD),))])
def test_a_single_key_signs_what_it_always_signed(key: KeyRing | bytes) -> None:
    assert derive_code(key, 23328, NONCE) == LEGACY_CODE
    assert threadref.make_message_id(key, 23328, UNIQUE, "desk.test") == LEGACY_MSGID
    assert verp.envelope_sender(key, 4711, "bok@desk.test", "+") == LEGACY_VERP
    assert loopmark.make_mark(key, "0123456789abcdef") == LEGACY_MARK


def test_after_rotation_new_signatures_use_the_current_key() -> None:
    code = derive_code(ROTATED, 23328, NONCE)
    assert code != LEGACY_CODE and code == derive_code(DROPPED, 23328, NONCE)
    msgid = threadref.make_message_id(ROTATED, 23328, UNIQUE, "desk.test")
    assert msgid != LEGACY_MSGID
    assert verp.envelope_sender(ROTATED, 4711, "bok@desk.test", "+") != LEGACY_VERP
    assert loopmark.make_mark(ROTATED, "0123456789abcdef") != LEGACY_MARK
    assert accepted_codes(ROTATED, 23328, NONCE) == (code, LEGACY_CODE)


def test_what_the_previous_key_signed_verifies_while_it_is_in_the_ring() -> None:
    codes = accepted_codes(ROTATED, 23328, NONCE)
    assert code_matches(codes, LEGACY_CODE) and code_matches(codes, LEGACY_CODE.upper())
    assert threadref.find_ticket_reference(ROTATED, "desk.test", LEGACY_MSGID) == 23328
    assert threadref.is_ours(ROTATED, "desk.test", LEGACY_MSGID)
    assert verp.returned_row(ROTATED, LEGACY_VERP, "bok@desk.test", "+") == 4711
    assert loopmark.is_ours(ROTATED, LEGACY_MARK)
    # and what the new key signs verifies too
    new_id = threadref.make_message_id(ROTATED, 7, UNIQUE, "desk.test")
    assert threadref.find_ticket_reference(ROTATED, "desk.test", new_id) == 7
    new_verp = verp.envelope_sender(ROTATED, 9, "bok@desk.test", "+")
    assert verp.returned_row(ROTATED, new_verp, "bok@desk.test", "+") == 9
    assert loopmark.is_ours(ROTATED, loopmark.make_mark(ROTATED, "abcdef012345"))


def test_once_the_previous_key_is_dropped_what_it_signed_is_refused() -> None:
    assert not code_matches(accepted_codes(DROPPED, 23328, NONCE), LEGACY_CODE)
    assert threadref.find_ticket_reference(DROPPED, "desk.test", LEGACY_MSGID) is None
    assert not threadref.is_ours(DROPPED, "desk.test", LEGACY_MSGID)
    assert verp.returned_row(DROPPED, LEGACY_VERP, "bok@desk.test", "+") is None
    assert not loopmark.is_ours(DROPPED, LEGACY_MARK)
    # what the current key signed under the old ring still holds
    code = derive_code(ROTATED, 23328, NONCE)
    assert code_matches(accepted_codes(DROPPED, 23328, NONCE), code)


def test_the_key_id_is_part_of_what_is_signed() -> None:
    """The same secret under another id signs differently: an id cannot be swapped."""
    renamed = KeyRing(((5, OLD),))
    assert derive_code(renamed, 23328, NONCE) != LEGACY_CODE
    assert threadref.make_message_id(renamed, 23328, UNIQUE, "desk.test") != LEGACY_MSGID
    assert verp.returned_row(renamed, LEGACY_VERP, "bok@desk.test", "+") is None
    assert not loopmark.is_ours(renamed, LEGACY_MARK)


def test_a_ring_needs_distinct_ids_and_one_key() -> None:
    with pytest.raises(ValueError):
        KeyRing(())
    with pytest.raises(ValueError):
        KeyRing(((1, NEW), (1, OLD)))
    assert KeyRing.of(OLD).current == (0, OLD) and ROTATED.ids == (1, 0)


def test_any_equal_compares_every_candidate() -> None:
    assert any_equal(["a" * 20, "b" * 20], "b" * 20)
    assert not any_equal(["a" * 20, "b" * 20], "c" * 20)
    assert not any_equal([], "c")
