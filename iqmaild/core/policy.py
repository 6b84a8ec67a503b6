"""The authorization rules: a pure function from facts to a verdict.

The policy is a table of named rules (DESIGN.md, "The authorization rules").
Loop rules come first and are terminal (``ignored``); every other rule that hits
adds its reason, and any reason makes the message ``unauthorized``. The verdict
records which rules hit, so "why?" always has an answer, and lists the effects
to carry out as data; this module does no I/O and reads no clock.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from iqmaild.core.addresses import local_part
from iqmaild.core.facts import DirectoryView, MessageFacts, PolicyConfig, TicketView
from iqmaild.core.tag import code_matches
from iqmaild.core.vocabulary import Channel, Decision, Reason, Role

DAEMON_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster"})
BULK_PRECEDENCE = frozenset({"bulk", "junk", "list"})


class TicketAction(StrEnum):
    NEW = "new"  # a new ticket gets its number and code at once, whatever the decision
    ATTACH = "attach"  # filed under an existing ticket
    NONE = "none"  # ignored mail that names no ticket


class ActionKind(StrEnum):
    AUTH_LINK = "auth_link"
    NOTICE = "notice"
    ACKNOWLEDGEMENT = "acknowledgement"
    STAFF = "staff"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    recipient: str | None = None  # None: the staff address
    include_code: bool = False


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reasons: tuple[Reason, ...]
    rules_hit: tuple[str, ...]
    sender: str | None
    sender_role: Role | None
    account_id: str | None
    service_id: str | None
    ticket: TicketAction
    ticket_number: int | None  # the existing ticket for ATTACH
    reopen: bool
    authorizes_ticket: bool
    unshared: tuple[str, ...]
    actions: tuple[Action, ...]


@dataclass(frozen=True)
class Situation:
    """What the rules look at: the facts plus everything derived from them once."""

    facts: MessageFacts
    directory: DirectoryView
    ticket: TicketView | None  # the ticket the message is attached to
    config: PolicyConfig
    sender: str | None
    account_id: str | None
    service_id: str | None
    candidate_accounts: tuple[str, ...]
    sender_role: Role | None
    sender_eligible: bool
    unshared: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    name: str
    reason: Reason
    hits: Callable[[Situation], bool]


def _auto_submitted(s: Situation) -> bool:
    value = s.facts.auto_submitted
    return (value is not None and value != "no") or s.facts.autoreply_headers


def _daemon_sender(s: Situation) -> bool:
    return any(local_part(a) in DAEMON_LOCAL_PARTS for a in s.facts.from_addresses)


def _admin_panel(s: Situation) -> bool:
    if s.sender is not None and s.sender in s.config.admin_senders:
        return True
    for name, pattern in s.config.admin_header_patterns:
        for header, value in s.facts.headers:
            if header == name and re.search(pattern, value, re.IGNORECASE):
                return True
    return False


def _tagged_ticket_missing(s: Situation) -> bool:
    return s.facts.tag is not None and s.ticket is None


def _code_missing(s: Situation) -> bool:
    if s.ticket is None:
        return False
    return s.facts.tag is None or s.facts.tag.code is None


def _code_mismatch(s: Situation) -> bool:
    tag = s.facts.tag
    if s.ticket is None or tag is None or tag.code is None:
        return False
    return not code_matches(s.ticket.code, tag.code)


def _sender_has(role: Role) -> Callable[[Situation], bool]:
    def check(s: Situation) -> bool:
        return s.sender is not None and not s.sender_eligible and s.sender_role is role

    return check


def _unknown_sender(s: Situation) -> bool:
    if s.sender is None or s.sender_eligible:
        return False
    if s.account_id is None and len(s.candidate_accounts) > 1:
        return False  # ambiguous_account says it; once the ticket names the account, it is not
    return s.sender_role in (None, Role.UNKNOWN)


def _ambiguous(s: Situation) -> bool:
    return s.sender is not None and s.account_id is None and len(s.candidate_accounts) > 1


# Loop signals: the message is stored and shown to staff, never answered.
LOOP_RULES: tuple[Rule, ...] = (
    Rule("null_return_path", Reason.BOUNCE, lambda s: s.facts.null_return_path),
    Rule("delivery_report", Reason.BOUNCE, lambda s: s.facts.delivery_report),
    Rule("daemon_sender", Reason.BOUNCE, _daemon_sender),
    Rule("auto_submitted", Reason.AUTO_SUBMITTED, _auto_submitted),
    Rule("bulk_precedence", Reason.MAILING_LIST, lambda s: s.facts.precedence in BULK_PRECEDENCE),
    Rule("list_id", Reason.MAILING_LIST, lambda s: s.facts.list_id),
)

# Authorization rules: each hit keeps the message unauthorized.
AUTHORIZATION_RULES: tuple[Rule, ...] = (
    Rule("malformed_sender", Reason.MALFORMED_SENDER, lambda s: s.sender is None),
    Rule("admin_panel", Reason.ADMIN_PANEL, _admin_panel),
    Rule("unknown_ticket", Reason.UNKNOWN_TICKET, _tagged_ticket_missing),
    Rule("code_missing", Reason.CODE_MISSING, _code_missing),
    Rule("code_mismatch", Reason.CODE_MISMATCH, _code_mismatch),
    Rule("ambiguous_account", Reason.AMBIGUOUS_ACCOUNT, _ambiguous),
    Rule("unknown_sender", Reason.UNKNOWN_SENDER, _unknown_sender),
    Rule("technical_address", Reason.TECHNICAL_ADDRESS, _sender_has(Role.TECHNICAL)),
    Rule("additional_address", Reason.ADDITIONAL_ADDRESS, _sender_has(Role.ADDITIONAL)),
    # A shared contact writing about a service not shared with them is, like a CC
    # to whom the service was not shared, a participant without a grant.
    Rule("unshared_sender", Reason.UNSHARED_CC, _sender_has(Role.SHARED)),
    Rule("unshared_cc", Reason.UNSHARED_CC, lambda s: bool(s.unshared)),
    Rule("dmarc_fail", Reason.DMARC_FAIL, lambda s: s.config.dmarc_enforce and s.facts.dmarc_fail),
)


def _role_on(directory: DirectoryView, email: str, account_id: str | None) -> Role:
    if account_id is None:
        roles = {e.role for e in directory.entries(email)}
        for role in (Role.TECHNICAL, Role.ADDITIONAL):
            if role in roles:
                return role
        return Role.UNKNOWN
    if directory.is_primary(email, account_id):
        return Role.PRIMARY
    if directory.shared_services(email, account_id):
        return Role.SHARED
    roles = {e.role for e in directory.entries(email) if e.account_id == account_id}
    for role in (Role.TECHNICAL, Role.ADDITIONAL):
        if role in roles:
            return role
    return Role.UNKNOWN


def situate(
    facts: MessageFacts,
    directory: DirectoryView,
    ticket: TicketView | None,
    config: PolicyConfig,
) -> Situation:
    """Derive sender, account, service and participants once for all rules."""
    sender = facts.sender
    candidates: tuple[str, ...] = ()
    panel = facts.channel is Channel.PANEL
    # The panel always creates a new ticket in the scope it names: a tag in its
    # Subject must not lend it another ticket's account or service, and no service
    # is inferred from the sender's shares.
    scope = None if panel else ticket
    account_id = facts.panel_account_id if panel else (scope.account_id if scope else None)
    if sender is not None:
        candidates = directory.eligible_accounts(sender)
        if account_id is None and len(candidates) == 1:
            account_id = candidates[0]
        if account_id is None and not candidates:
            owners = {e.account_id for e in directory.entries(sender)}
            account_id = owners.pop() if len(owners) == 1 else None
    service_id = facts.panel_service_id if panel else (scope.service_id if scope else None)
    new_by_mail = scope is None and not panel
    if new_by_mail and account_id and sender and not directory.is_primary(sender, account_id):
        services = directory.shared_services(sender, account_id)
        if service_id is None and len(services) == 1:
            service_id = services[0]
    role = _role_on(directory, sender, account_id) if sender else None
    eligible = bool(sender and account_id and directory.may_act(sender, account_id, service_id))
    unshared: tuple[str, ...] = ()
    if account_id is not None:
        unshared = tuple(
            r
            for r in dict.fromkeys(facts.recipients)
            if r not in config.desk_addresses
            and r != sender
            and not directory.may_act(r, account_id, service_id)
        )
    return Situation(
        facts,
        directory,
        ticket,
        config,
        sender,
        account_id,
        service_id,
        candidates,
        role,
        eligible,
        unshared,
    )


def classify(
    facts: MessageFacts,
    directory: DirectoryView,
    ticket: TicketView | None,
    config: PolicyConfig,
) -> Verdict:
    """Decide one message. ``ticket`` is the ticket its tag or thread reference names."""
    s = situate(facts, directory, ticket, config)
    loop_hits = [rule for rule in LOOP_RULES if rule.hits(s)]
    if loop_hits:
        return _verdict(
            s,
            Decision.IGNORED,
            loop_hits,
            TicketAction.ATTACH if ticket else TicketAction.NONE,
            (Action(ActionKind.STAFF),),
        )
    actions: tuple[Action, ...]
    if facts.channel is Channel.PANEL:
        actions = (Action(ActionKind.STAFF),)
        # The acknowledgement carries the code: only to a sender who may act on
        # the ticket (the panel writes as the account's primary address).
        if s.sender and s.sender_eligible:
            actions += (Action(ActionKind.ACKNOWLEDGEMENT, s.sender, include_code=True),)
        return _verdict(s, Decision.AUTHORIZED, [], TicketAction.NEW, actions)

    hits = [rule for rule in AUTHORIZATION_RULES if rule.hits(s)]
    ticket_action = TicketAction.ATTACH if ticket else TicketAction.NEW
    if hits:
        actions = (Action(ActionKind.STAFF),)
        if s.sender and (config.notify_unknown_senders or directory.knows(s.sender)):
            actions += (Action(ActionKind.NOTICE, s.sender, include_code=s.sender_eligible),)
        return _verdict(s, Decision.UNAUTHORIZED, hits, ticket_action, actions)
    if ticket is not None:
        return _verdict(s, Decision.AUTHORIZED, [], ticket_action, (Action(ActionKind.STAFF),))
    actions = (
        Action(ActionKind.STAFF),
        Action(ActionKind.AUTH_LINK, s.sender, include_code=True),
    )
    return _verdict(s, Decision.PENDING, [], ticket_action, actions)


def _verdict(
    s: Situation,
    decision: Decision,
    hits: list[Rule],
    ticket_action: TicketAction,
    actions: tuple[Action, ...],
) -> Verdict:
    reasons = tuple(dict.fromkeys(rule.reason for rule in hits))
    unshared = s.unshared
    if s.sender and any(rule.name == "unshared_sender" for rule in hits):
        unshared = (s.sender, *unshared)
    attached = ticket_action is TicketAction.ATTACH and s.ticket is not None
    return Verdict(
        decision=decision,
        reasons=reasons,
        rules_hit=tuple(rule.name for rule in hits),
        sender=s.sender,
        sender_role=s.sender_role,
        account_id=s.account_id,
        service_id=s.service_id,
        ticket=ticket_action,
        ticket_number=s.ticket.number if attached and s.ticket else None,
        # Only an authorized follow-up reopens: a guessed number must not reopen tickets.
        reopen=bool(attached and s.ticket and s.ticket.closed and decision is Decision.AUTHORIZED),
        authorizes_ticket=bool(
            attached and s.ticket and not s.ticket.authorized and decision is Decision.AUTHORIZED
        ),
        unshared=unshared if Reason.UNSHARED_CC in reasons else (),
        actions=actions,
    )
