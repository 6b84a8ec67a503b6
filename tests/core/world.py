"""The directory, tickets and message builders the core tests share.

Same world as ``tests/data/README.md``, plus ``ops@partner.test`` (shares on two
services of one account) and account ``gamma`` (a third account nobody else is on).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from iqmaild.core.facts import (
    AddressEntry,
    DirectoryView,
    MessageFacts,
    PolicyConfig,
    ShareEntry,
    TicketView,
)
from iqmaild.core.tag import TagMatch, derive_code
from iqmaild.core.vocabulary import Channel, MailKind, Role

KEY = b"k" * 32
DESK = "bok@desk.test"

OWNER = "owner@acme.test"
TECH = "tech@acme.test"
EXTRA = "extra@acme.test"
TECH_SHARED = "tech-shared@acme.test"
DEV = "dev@partner.test"  # acme-www and beta-vps: two accounts
MAIL_ADMIN = "mail-admin@partner.test"  # acme-mail only
OPS = "ops@partner.test"  # acme-www and acme-mail: two services of one account
BOSS = "boss@beta.test"
CHIEF = "chief@gamma.test"
STRANGER = "anna@nieznana-firma.test"
ADMIN_ROBOT = "robot@admin.iq.test"


@dataclass(frozen=True)
class AccountSpec:
    id: str
    primary: str
    technical: tuple[str, ...] = ()
    additional: tuple[str, ...] = ()
    services: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # service -> shares


def build_directory(accounts: Iterable[AccountSpec]) -> DirectoryView:
    addresses: dict[str, list[AddressEntry]] = defaultdict(list)
    shares: dict[str, list[ShareEntry]] = defaultdict(list)
    for account in accounts:
        addresses[account.primary].append(AddressEntry(account.id, Role.PRIMARY))
        for email in account.technical:
            addresses[email].append(AddressEntry(account.id, Role.TECHNICAL))
        for email in account.additional:
            addresses[email].append(AddressEntry(account.id, Role.ADDITIONAL))
        for service_id, shared_with in account.services.items():
            for email in shared_with:
                shares[email].append(ShareEntry(account.id, service_id))
    return DirectoryView(
        {k: tuple(v) for k, v in addresses.items()}, {k: tuple(v) for k, v in shares.items()}
    )


ACCOUNTS = (
    AccountSpec(
        "acme",
        OWNER,
        technical=(TECH, TECH_SHARED),
        additional=(EXTRA,),
        services={"acme-www": (DEV, OPS), "acme-mail": (MAIL_ADMIN, TECH_SHARED, OPS)},
    ),
    AccountSpec("beta", BOSS, services={"beta-vps": (DEV,)}),
    AccountSpec("gamma", CHIEF, services={"gamma-db": ()}),
)
DIRECTORY = build_directory(ACCOUNTS)
ALL_ADDRESSES = (OWNER, TECH, EXTRA, TECH_SHARED, DEV, MAIL_ADMIN, OPS, BOSS, CHIEF)

CONFIG = PolicyConfig(
    desk_addresses=frozenset({DESK}),
    admin_header_patterns=(("x-mailer", r"IQ\.Admin"),),
    admin_senders=frozenset({ADMIN_ROBOT}),
    dmarc_enforce=True,
    notify_unknown_senders=True,
)


PRIMARY_OF = {a.id: a.primary for a in ACCOUNTS}


def ticket(
    number: int,
    account_id: str | None,
    service_id: str | None = None,
    *,
    closed: bool = False,
    authorized: bool = True,
    requester: str | None = None,
) -> TicketView:
    code = derive_code(KEY, number, b"nonce-%d" % number)
    return TicketView(
        number,
        code,
        account_id,
        service_id,
        closed=closed,
        authorized=authorized,
        requester=requester,
        primary=PRIMARY_OF.get(account_id or ""),
    )


T_OPEN = ticket(1000, "acme")  # like the harness's ticket 1000: no service
T_WWW = ticket(1001, "acme", "acme-www")
T_CLOSED = ticket(1002, "acme", closed=True)
T_PENDING = ticket(1003, "acme", authorized=False)
T_GAMMA = ticket(1004, "gamma")
T_ORPHAN = ticket(1005, None, authorized=False)  # opened by an unknown sender
T_BETA = ticket(1006, "beta", "beta-vps")
WRONG_CODE = "0" * 20


def tag(t: TicketView) -> TagMatch:
    """The tag of ``t`` with its valid code."""
    return TagMatch(t.number, t.code)


def tag_with(t: TicketView, code: str | None) -> TagMatch:
    """The tag of ``t`` with another code, or none (``None``)."""
    return TagMatch(t.number, code)


def mail(
    sender: str | tuple[str, ...] | None = OWNER,
    *,
    cc: tuple[str, ...] = (),
    channel: Channel = Channel.SMTP,
    subject: str = "Problem z pocztą",
    **extra: Any,
) -> MessageFacts:
    """Facts of one message to the desk; ``sender`` None means no From at all."""
    if sender is None:
        froms: tuple[str, ...] = ()
    elif isinstance(sender, str):
        froms = (sender,)
    else:
        froms = sender
    extra.setdefault("from_defect", sender is None)
    return MessageFacts(
        channel=channel,
        from_addresses=froms,
        recipients=(DESK, *cc),
        subject=subject,
        **extra,
    )


ActionSpec = tuple[MailKind, str | None, bool]
STAFF: ActionSpec = (MailKind.STAFF, None, False)


def link(recipient: str) -> ActionSpec:
    """The authorization request never carries the code (an auto-reply would return it)."""
    return (MailKind.AUTH_REQUEST, recipient, False)


def notice(recipient: str, *, code: bool) -> ActionSpec:
    """To a sender who may act on the ticket; the code only once the ticket is authorized."""
    return (MailKind.NOTICE, recipient, code)


def refusal(recipient: str) -> ActionSpec:
    """To anyone else: names no ticket, carries no code."""
    return (MailKind.REFUSAL, recipient, False)


def code_changed(recipient: str) -> ActionSpec:
    return (MailKind.CODE_CHANGED, recipient, True)


def ack(recipient: str) -> ActionSpec:
    return (MailKind.ACKNOWLEDGEMENT, recipient, True)
