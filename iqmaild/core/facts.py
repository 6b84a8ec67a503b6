"""The inputs of classification: what a message says, what the directory knows.

Plain frozen data, built by the adapters; the policy reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from iqmaild.core.addresses import split_extension
from iqmaild.core.tag import TagMatch
from iqmaild.core.vocabulary import Channel, MailKind, Role


@dataclass(frozen=True)
class MessageFacts:
    """What the parser established about one message."""

    channel: Channel
    from_addresses: tuple[str, ...]  # normalized mailboxes of the From header(s)
    from_defect: bool  # no From, several From headers, or an unparseable one
    recipients: tuple[str, ...]  # normalized To + Cc mailboxes
    subject: str  # decoded, unfolded, control characters removed
    tag: TagMatch | None = None
    thread_ticket: int | None = None  # from a signed reference in In-Reply-To/References
    null_return_path: bool = False
    auto_submitted: str | None = None  # lowercased value of Auto-Submitted
    precedence: str | None = None
    list_id: bool = False
    autoreply_headers: bool = False  # X-Autoreply, X-Autorespond and kin
    delivery_report: bool = False  # multipart/report; report-type=delivery-status
    dmarc_fail: bool = False  # from a trusted Authentication-Results header
    panel_account_id: str | None = None  # the Customer Panel names the account
    panel_service_id: str | None = None
    # (lowercased name, decoded value) of every header a rule reads (admin markers)
    headers: tuple[tuple[str, str], ...] = ()
    # To/Cc entries that could not be read whole or normalized: they count as
    # participants without a grant (fail closed), shown as cleaned text.
    recipients_unreadable: tuple[str, ...] = ()
    own_mail: bool = False  # our own signed mark came back as incoming mail
    # A message we stored before (same Message-ID) comes back through more hops:
    # our staff copy after a forwarder stripped our marks.
    seen_before: bool = False
    answers_notice: bool = False  # In-Reply-To names a notice or refusal of ours
    hops: int = 0  # Received headers
    returned_outbox_id: int | None = None  # sent to our signed envelope sender of that row

    @property
    def sender(self) -> str | None:
        """The single From mailbox, when there is exactly one."""
        if self.from_defect or len(self.from_addresses) != 1:
            return None
        return self.from_addresses[0]


@dataclass(frozen=True)
class AddressEntry:
    account_id: str
    role: Role  # primary, technical or additional


@dataclass(frozen=True)
class ShareEntry:
    account_id: str
    service_id: str


@dataclass(frozen=True)
class DirectoryView:
    """The part of the directory that the addresses of one message touch."""

    addresses: Mapping[str, tuple[AddressEntry, ...]] = field(default_factory=dict)
    shares: Mapping[str, tuple[ShareEntry, ...]] = field(default_factory=dict)

    def entries(self, email: str) -> tuple[AddressEntry, ...]:
        return self.addresses.get(email, ())

    def shares_of(self, email: str) -> tuple[ShareEntry, ...]:
        return self.shares.get(email, ())

    def knows(self, email: str) -> bool:
        """The address is in the directory at all (any role or any share)."""
        return bool(self.entries(email) or self.shares_of(email))

    def is_primary(self, email: str, account_id: str) -> bool:
        return any(
            e.account_id == account_id and e.role is Role.PRIMARY for e in self.entries(email)
        )

    def shared_services(self, email: str, account_id: str) -> tuple[str, ...]:
        return tuple(s.service_id for s in self.shares_of(email) if s.account_id == account_id)

    def may_act(
        self, email: str, account_id: str, service_id: str | None, requester: str | None
    ) -> bool:
        """May act on a ticket (its code, its notices, authorizing it).

        The primary address always; a shared contact on the ticket's service. A
        ticket without a service is the account's: the primary's, and only the
        shared contact who opened it (with a share on the account) besides; a share
        on one service must not open every account-level ticket to its holder.
        """
        if self.is_primary(email, account_id):
            return True
        services = self.shared_services(email, account_id)
        if service_id is None:
            return bool(services) and email == requester
        return service_id in services

    def may_take_part(self, email: str, account_id: str, service_id: str | None) -> bool:
        """May be among To/Cc: the primary, a share on the service (any share while
        the ticket has none)."""
        if self.is_primary(email, account_id):
            return True
        services = self.shared_services(email, account_id)
        return bool(services) if service_id is None else service_id in services

    def eligible_accounts(self, email: str) -> tuple[str, ...]:
        """Accounts on which the address holds an explicit grant (primary or a share)."""
        accounts = {e.account_id for e in self.entries(email) if e.role is Role.PRIMARY}
        accounts |= {s.account_id for s in self.shares_of(email)}
        return tuple(sorted(accounts))


@dataclass(frozen=True)
class TicketView:
    """The ticket a message refers to, as far as classification needs it."""

    number: int
    code: str
    account_id: str | None
    service_id: str | None
    closed: bool = False
    authorized: bool = False
    requester: str | None = None  # who opened it
    primary: str | None = None  # the account's primary address
    purged: bool = False  # retention or erasure removed its personal data
    # Every code that verifies (one per key of the ring, ``code`` first); empty: ``code``.
    codes: tuple[str, ...] = ()

    @property
    def accepted_codes(self) -> tuple[str, ...]:
        return self.codes or (self.code,)


@dataclass(frozen=True)
class ReturnedView:
    """The outbox row a returned message (bounce, delay report) is about."""

    kind: MailKind
    reported: bool  # staff already got a copy of a report about this row


@dataclass(frozen=True)
class PolicyConfig:
    """The configured parts of the rules."""

    desk_addresses: frozenset[str]
    admin_header_patterns: tuple[tuple[str, str], ...] = ()  # (lowercased name, regex)
    admin_senders: frozenset[str] = frozenset()
    dmarc_enforce: bool = False
    notify_unknown_senders: bool = True
    max_hops: int = 30  # more Received headers than this: a routing loop
    delimiter: str = "+"  # the desk's sub-addresses (bok+faktury@) are the desk
    return_path: str = ""  # base of our signed envelope senders

    def is_ours(self, address: str) -> bool:
        """A desk address, a sub-address of one, or one of our return addresses."""
        if address in self.desk_addresses:
            return True
        base, extension = split_extension(address, self.delimiter)
        return bool(extension) and (base in self.desk_addresses or base == self.return_path)
