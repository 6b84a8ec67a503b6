"""IMAP mode's pure rules: where a message goes, batches, and reading aioimaplib's answers."""

from __future__ import annotations

from iqmaild.imap import filing

FOLDERS = {
    "authorized": "Authorized",
    "pending": "Pending",
    "unauthorized": "Unauthorized",
    "ignored": "Ignored",
}


def test_each_decision_has_its_folder_and_the_ticket_its_keyword() -> None:
    for decision, folder in FOLDERS.items():
        plan = filing.filing_for(decision, "processed", 23328, FOLDERS, "IQ-")
        assert plan == filing.Filing(folder, ("IQ-23328",))
    assert filing.filing_for("ignored", "processed", None, FOLDERS, "IQ-").keywords == ()


def test_a_dead_letter_stays_in_the_watched_folder_marked() -> None:
    plan = filing.filing_for(None, "dead", None, FOLDERS, "IQ-")
    assert plan == filing.Filing(None, ("IQ-unprocessed",))


def test_batches_are_bounded_by_count_and_bytes_and_a_large_message_goes_alone() -> None:
    sizes = [(uid, 100) for uid in range(1, 8)] + [(8, 10_000), (9, 100)]
    assert filing.batches(sizes, 3, 1_000) == [[1, 2, 3], [4, 5, 6], [7], [8], [9]]
    assert filing.batches([(5, 10), (2, 10)], 10, 1_000) == [[2, 5]]
    assert filing.batches([], 10, 100) == []


def test_uid_sets_are_compact() -> None:
    assert filing.uid_set([5, 1, 2, 3, 9, 11, 12, 2]) == "1:3,5,9,11:12"
    assert filing.uid_set([7]) == "7"


def test_select_and_search_answers_as_aioimaplib_hands_them() -> None:
    select = [
        b"FLAGS (\\Answered \\Seen)",
        b"2 EXISTS",
        b"OK [UIDVALIDITY 1796134285] UIDs valid",
        b"OK [UIDNEXT 3] Predicted next UID",
        b"[READ-WRITE] Select completed (0.001 + 0.000 secs).",
    ]
    assert filing.select_status(select) == (1796134285, 3)
    # "UID 5:*" names the highest UID even when it is below 5; the last line is the
    # completion text (its digits are no UIDs).
    assert filing.search_uids([b"1 4", b"Search completed (0.001 secs)."], 3) == [4]
    assert filing.search_uids([b"3", b"Search 7 completed"], 3) == []
    assert filing.search_uids([b"OK done"], 0) == []


def test_fetch_answers_with_uid_before_or_after_the_body() -> None:
    lines = [
        b"1 FETCH (UID 5 BODY[] {3}",
        bytearray(b"abc"),
        b")",
        b"2 FETCH (BODY[] {2}",
        bytearray(b"de"),
        b" UID 9)",
        b"3 FETCH (FLAGS (\\Seen))",  # an unsolicited flag update: no body
        b"Fetch completed (0.001 secs).",
    ]
    assert filing.fetch_bodies(lines) == [(5, b"abc"), (9, b"de")]
    sizes = [b"1 FETCH (UID 1 RFC822.SIZE 574)", b"2 FETCH (RFC822.SIZE 10 UID 2)", b"done"]
    assert filing.fetch_sizes(sizes) == {1: 574, 2: 10}


def test_only_new_mail_wakes_an_idle() -> None:
    assert filing.wakes([b"5 EXISTS", b"1 RECENT"])
    assert not filing.wakes([b"OK Still here"])
    assert not filing.wakes([b"3 EXPUNGE"])


def test_the_envelope_is_read_from_the_delivery_headers() -> None:
    raw = (
        b"Return-Path: <owner@acme.test>\r\nDelivered-To: bok+faktury@desk.test\r\n"
        b"Received: by mx\r\nReturn-Path: <older@relay.test>\r\nFrom: owner@acme.test\r\n"
        b"\r\nDelivered-To: in-the-body@x.test\r\n"
    )
    assert filing.envelope(raw, "bok@desk.test") == ("owner@acme.test", ["bok+faktury@desk.test"])
    bounce = b"Return-Path: <>\r\nFrom: MAILER-DAEMON@mx.test\r\n\r\nbody"
    assert filing.envelope(bounce, "bok@desk.test") == ("<>", ["bok@desk.test"])
    # Put there by a client, not delivered: the sender is unknown, never the null sender.
    sender, rcpts = filing.envelope(b"From: a@b.test\r\n\r\nx", "bok@desk.test")
    assert sender not in ("", "<>") and rcpts == ["bok@desk.test"]


def test_folder_names_are_modified_utf7_and_quoted() -> None:
    assert filing.mutf7("Zgłoszenia") == "Zg&AUI-oszenia"
    assert filing.mutf7("A&B") == "A&-B"
    assert filing.mutf7("Nieautoryzowane") == "Nieautoryzowane"
    assert filing.quote('Dziwny "folder"') == '"Dziwny \\"folder\\""'
