"""Property-based tests of the core (hypothesis; skipped when it is not installed)."""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis")

from hypothesis import given, settings
from hypothesis import strategies as st

from iqmaild.core.addresses import normalize
from iqmaild.core.facts import MessageFacts, PolicyConfig, TicketView
from iqmaild.core.policy import classify
from iqmaild.core.tag import TagFormat, TagMatch, code_matches
from iqmaild.core.threadref import find_ticket_reference, make_message_id
from iqmaild.core.vocabulary import Channel
from tests.core.invariants import check_verdict
from tests.core.world import (
    ALL_ADDRESSES,
    CONFIG,
    DESK,
    DIRECTORY,
    STRANGER,
    T_BETA,
    T_CLOSED,
    T_GAMMA,
    T_OPEN,
    T_ORPHAN,
    T_PENDING,
    T_WWW,
    WRONG_CODE,
)

FAST = settings(database=None, deadline=None)

# --- the tag ---------------------------------------------------------------------

REPLY_PREFIXES = ("Re", "RE", "re", "Fwd", "FW", "AW", "Odp", "SV", "WG", "TR", "Re[2]", "Re (3)")
hex_code = st.text(alphabet="0123456789abcdefABCDEF", min_size=20, max_size=20)
numbers = st.integers(min_value=1, max_value=10**18 - 1)
spaces = st.sampled_from(["", " ", "  ", "\t"])
prefix_chain = st.lists(
    st.tuples(st.sampled_from(REPLY_PREFIXES), spaces, spaces).map(
        lambda t: f"{t[0]}{t[1]}:{t[2]}"
    ),
    max_size=5,
).map(" ".join)
# Customer text: no brackets and no colons, so it never holds a tag or a reply prefix.
customer_text = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Cc"), blacklist_characters="[]:：", max_codepoint=0x17F
    ),
    max_size=40,
)
tag_prefix = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+",
    min_size=1,
    max_size=10,
)


def _flip_case(text: str, flips: list[bool]) -> str:
    padded = flips + [False] * (len(text) - len(flips))
    return "".join(c.swapcase() if f else c for c, f in zip(text, padded, strict=False))


@FAST
@given(
    tag_prefix,
    numbers,
    hex_code,
    prefix_chain,
    customer_text,
    st.lists(st.booleans(), max_size=12),
)
def test_tag_format_find_round_trip(
    prefix: str, number: int, code: str, replies: str, text: str, flips: list[bool]
) -> None:
    tags = TagFormat(prefix)
    full = tags.full(number, code)
    # a mail client may change the tag's case and put reply prefixes in front
    written = "[" + _flip_case(full[1:], flips) if prefix.isascii() else full
    subject = f"{replies} {written} {text}"
    assert tags.find(subject) == TagMatch(number, code.lower())
    assert code_matches(code.lower(), tags.find(subject).code)  # type: ignore[union-attr]
    assert tags.find(f"{replies} {tags.short(number)} {text}") == TagMatch(number, None)
    assert tags.strip(subject) == " ".join(text.split())


@FAST
@given(numbers, hex_code, customer_text)
def test_outbound_subject_carries_the_tag_once(number: int, code: str, text: str) -> None:
    tags = TagFormat("IQ.pl")
    incoming = f"Re: {tags.full(number, code)} {text}"
    outbound = f"{tags.full(number, code)} {tags.strip(incoming)}".strip()
    assert outbound.count("[IQ.pl#") == 1
    assert tags.find(outbound) == TagMatch(number, code.lower())


# --- thread references -------------------------------------------------------------

uniques = st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyz", min_size=6, max_size=40)


@FAST
@given(st.binary(min_size=1, max_size=64), numbers, uniques, st.lists(uniques, max_size=4))
def test_thread_reference_round_trip(
    key: bytes, number: int, unique: str, others: list[str]
) -> None:
    ours = make_message_id(key, number, unique, "desk.test")
    foreign = " ".join(f"<{o}@mail.example>" for o in others)
    assert find_ticket_reference(key, "desk.test", ours) == number
    assert find_ticket_reference(key, "desk.test", "", f"{ours} {foreign}") == number
    assert find_ticket_reference(key + b"x", "desk.test", ours) is None
    assert find_ticket_reference(key, "other.test", ours) is None


# --- addresses ----------------------------------------------------------------------

local_parts = st.text(alphabet="abcdefghijXYZ0123456789.+_-", min_size=1, max_size=16)
labels = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyząćęłńóśźżABCŁŻ0123456789", min_size=1, max_size=12),
    min_size=1,
    max_size=3,
)


@FAST
@given(local_parts, labels, st.sampled_from(["", "."]))
def test_normalize_is_idempotent_and_ascii_domain(local: str, parts: list[str], dot: str) -> None:
    raw = f"{local}@{'.'.join(parts)}.test{dot}"
    once = normalize(raw)
    assert once is not None
    assert normalize(once) == once
    assert once == once.lower()
    assert once.rpartition("@")[2].isascii()
    assert normalize(raw.upper()) == once


# --- the policy: invariants over random messages ---------------------------------------

TICKETS = (None, T_OPEN, T_WWW, T_CLOSED, T_PENDING, T_GAMMA, T_ORPHAN, T_BETA)
PEOPLE = (*ALL_ADDRESSES, STRANGER, "robot@admin.iq.test", "postmaster@acme.test")
LOOPS = {
    "null": {"null_return_path": True},
    "dsn": {"delivery_report": True},
    "auto": {"auto_submitted": "auto-replied"},
    "bulk": {"precedence": "bulk"},
    "list": {"list_id": True},
    "xauto": {"autoreply_headers": True},
}


@st.composite
def situations(draw: st.DrawFn) -> tuple[MessageFacts, TicketView | None, PolicyConfig]:
    ticket = draw(st.sampled_from(TICKETS))
    sender_kind = draw(st.sampled_from(["one"] * 8 + ["none", "two"]))
    if sender_kind == "one":
        froms: tuple[str, ...] = (draw(st.sampled_from(PEOPLE)),)
    elif sender_kind == "two":
        froms = tuple(draw(st.lists(st.sampled_from(PEOPLE), min_size=2, max_size=2)))
    else:
        froms = ()
    code = draw(st.sampled_from(["valid", "wrong", "none", "absent", "absent"]))
    number = ticket.number if ticket else 99999
    tag = None
    if code == "valid":
        tag = TagMatch(number, ticket.code if ticket else WRONG_CODE)
    elif code == "wrong":
        tag = TagMatch(number, WRONG_CODE)
    elif code == "none":
        tag = TagMatch(number, None)
    if tag is None and ticket is None:
        thread = None
    elif tag is None:
        thread = ticket.number if ticket else None
    else:
        thread = draw(st.sampled_from([None, number]))
    if tag is None and thread is None:
        ticket = None  # the classify stage looks tickets up by tag or reference only
    channel = draw(st.sampled_from([Channel.SMTP] * 4 + [Channel.IMAP, Channel.PANEL]))
    extra: dict[str, object] = {}
    if channel is Channel.PANEL:
        extra["panel_account_id"] = draw(st.sampled_from(["acme", "beta", "gamma"]))
        extra["panel_service_id"] = draw(st.sampled_from([None, "acme-www", "beta-vps"]))
    loop = draw(st.sampled_from([None] * 6 + sorted(LOOPS)))
    if loop:
        extra.update(LOOPS[loop])
    if draw(st.integers(0, 9)) == 0:
        extra["headers"] = (("x-mailer", "IQ.Admin"),)
    facts = MessageFacts(
        channel=channel,
        from_addresses=froms,
        from_defect=not froms or draw(st.integers(0, 19)) == 0,
        recipients=(DESK, *draw(st.lists(st.sampled_from((*PEOPLE, DESK)), max_size=3))),
        subject="x",
        tag=tag,
        thread_ticket=thread,
        dmarc_fail=draw(st.integers(0, 5)) == 0,
        **extra,  # type: ignore[arg-type]
    )
    config = PolicyConfig(
        desk_addresses=CONFIG.desk_addresses,
        admin_header_patterns=CONFIG.admin_header_patterns,
        admin_senders=CONFIG.admin_senders,
        dmarc_enforce=draw(st.booleans()),
        notify_unknown_senders=draw(st.booleans()),
    )
    return facts, ticket, config


@settings(database=None, deadline=None, max_examples=400)
@given(situations())
def test_policy_invariants(situation: tuple[MessageFacts, TicketView | None, PolicyConfig]) -> None:
    facts, ticket, config = situation
    check_verdict(facts, DIRECTORY, ticket, config, classify(facts, DIRECTORY, ticket, config))
