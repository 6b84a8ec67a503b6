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
from dataclasses import dataclass, replace
from enum import StrEnum

from iqmaild.core.addresses import local_part
from iqmaild.core.facts import (
    DirectoryView,
    MessageFacts,
    PolicyConfig,
    ReturnedView,
    TicketView,
)
from iqmaild.core.mail import (
    Acknowledgement,
    AuthRequest,
    CodeChanged,
    MailIntent,
    Notice,
    Refusal,
    StaffCopy,
)
from iqmaild.core.tag import code_matches
from iqmaild.core.vocabulary import Channel, Decision, MailKind, Reason, Role

DAEMON_LOCAL_PARTS = frozenset({"mailer-daemon", "postmaster"})
BULK_PRECEDENCE = frozenset({"bulk", "junk", "list"})


class TicketAction(StrEnum):
    NEW = "new"  # a new ticket gets its number and code at once, whatever the decision
    ATTACH = "attach"  # filed under an existing ticket
    NONE = "none"  # ignored mail that names no ticket


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
    unshared: tuple[str, ...]
    mails: tuple[MailIntent, ...]
    # The message carried the ticket's valid code to someone who may not act on
    # the ticket: the ticket gets a new code, mailed only to eligible addresses.
    rotate_code: bool = False


@dataclass(frozen=True)
class Situation:
    """What the rules look at: the facts plus everything derived from them once."""

    facts: MessageFacts
    directory: DirectoryView
    ticket: TicketView | None  # the ticket the message is attached to
    config: PolicyConfig
    returned: ReturnedView | None
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
    return not code_matches(s.ticket.accepted_codes, tag.code)


def _code_valid(s: Situation) -> bool:
    tag = s.facts.tag
    return (
        s.ticket is not None and tag is not None and code_matches(s.ticket.accepted_codes, tag.code)
    )


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


# Loop signals: the message is stored, never answered. Mail of our own that came
# back and routing loops are not even copied to staff (the copy would loop too).
LOOP_RULES: tuple[Rule, ...] = (
    Rule("returned_mail", Reason.BOUNCE, lambda s: s.facts.returned_outbox_id is not None),
    Rule("own_mail_returned", Reason.AUTO_SUBMITTED, lambda s: s.facts.own_mail),
    Rule("message_returned", Reason.AUTO_SUBMITTED, lambda s: s.facts.seen_before),
    Rule("hop_limit", Reason.AUTO_SUBMITTED, lambda s: s.facts.hops > s.config.max_hops),
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
    returned: ReturnedView | None = None,
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
    requester = scope.requester if scope is not None else sender
    eligible = bool(
        sender and account_id and directory.may_act(sender, account_id, service_id, requester)
    )
    unshared: tuple[str, ...] = ()
    if account_id is not None:
        unshared = tuple(
            r
            for r in dict.fromkeys(facts.recipients)
            if not config.is_ours(r)
            and r != sender
            and not directory.may_take_part(r, account_id, service_id)
        )
        # A recipient we could not read whole may be anyone: fail closed.
        unshared += tuple(dict.fromkeys(facts.recipients_unreadable))
    return Situation(
        facts,
        directory,
        ticket,
        config,
        returned,
        sender,
        account_id,
        service_id,
        candidates,
        role,
        eligible,
        unshared,
    )


# A tag or thread reference naming a ticket whose personal data retention (or an
# erasure) removed: the message is decided as if it named no ticket, so a late
# follow-up opens a new ticket (pending, with a link) instead of reviving a shell
# that holds no requester, account or subject. The old code proves nothing any more.
PURGED_TICKET = "purged_ticket"


def follows_purged(ticket: TicketView | None) -> bool:
    """The rule ``purged_ticket``: the named ticket is a purged shell."""
    return ticket is not None and ticket.purged


NO_STAFF_COPY = frozenset({"own_mail_returned", "message_returned", "hop_limit"})
# Reports about our own mail: a code in them went to the MTA, not to a person.
REPORTS = frozenset({"returned_mail", "null_return_path", "delivery_report", "daemon_sender"})


def classify(
    facts: MessageFacts,
    directory: DirectoryView,
    ticket: TicketView | None,
    config: PolicyConfig,
    returned: ReturnedView | None = None,
) -> Verdict:
    """Decide one message.

    ``ticket`` is the ticket its tag or thread reference names (for returned
    mail: the ticket of the outbox row); ``returned`` the outbox row a report
    sent to our signed envelope sender is about.
    """
    if follows_purged(ticket):
        fresh = replace(facts, tag=None, thread_ticket=None)
        verdict = classify(fresh, directory, None, config, returned)
        return replace(verdict, rules_hit=(PURGED_TICKET, *verdict.rules_hit))
    s = situate(facts, directory, ticket, config, returned)
    loop_hits = [rule for rule in LOOP_RULES if rule.hits(s)]
    if loop_hits:
        return _loop_verdict(s, loop_hits)
    if facts.channel is Channel.PANEL:
        # The acknowledgement carries the code: only to a sender who may act on
        # the ticket (the panel writes as the account's primary address).
        answers: list[MailIntent] = []
        if s.sender and s.sender_eligible:
            answers.append(
                MailIntent(MailKind.ACKNOWLEDGEMENT, s.sender, True, Acknowledgement("panel"))
            )
        return _verdict(s, Decision.AUTHORIZED, [], TicketAction.NEW, answers)

    hits = [rule for rule in AUTHORIZATION_RULES if rule.hits(s)]
    ticket_action = TicketAction.ATTACH if ticket else TicketAction.NEW
    leaked = _code_valid(s) and (not s.sender_eligible or bool(s.unshared))
    if hits:
        return _verdict(
            s, Decision.UNAUTHORIZED, hits, ticket_action, _answers(s, hits, leaked), leaked
        )
    if ticket is not None:
        # The code is only ever mailed once the ticket is authorized, so only then
        # does it prove anything; a pending ticket waits for the click.
        decision = Decision.AUTHORIZED if ticket.authorized else Decision.PENDING
        return _verdict(s, decision, [], ticket_action, [])
    # The link names the ticket without its code: a reply to it (an auto-responder
    # quoting it) carries nothing that authorizes.
    link = MailIntent(MailKind.AUTH_REQUEST, s.sender, False, AuthRequest())
    return _verdict(s, Decision.PENDING, [], ticket_action, [link])


def _reasons(hits: list[Rule]) -> tuple[Reason, ...]:
    return tuple(dict.fromkeys(rule.reason for rule in hits))


def _unshared(s: Situation, hits: list[Rule]) -> tuple[str, ...]:
    if Reason.UNSHARED_CC not in _reasons(hits):
        return ()
    if s.sender and any(rule.name == "unshared_sender" for rule in hits):
        return (s.sender, *s.unshared)
    return s.unshared


def _answers(s: Situation, hits: list[Rule], leaked: bool) -> list[MailIntent]:
    """What an unauthorized message's sender (and, after a leak, the owner) is told."""
    out: list[MailIntent] = []
    sender = s.sender
    reasons = tuple(r.value for r in _reasons(hits))
    authorized = s.ticket is not None and s.ticket.authorized
    if sender and (s.config.notify_unknown_senders or s.directory.knows(sender)):
        if s.sender_eligible:
            # Their own ticket: named, with its (after a leak: new) code once authorized.
            notice = Notice(reasons, _unshared(s, hits), authorized, leaked)
            out.append(MailIntent(MailKind.NOTICE, sender, authorized, notice))
        else:
            out.append(MailIntent(MailKind.REFUSAL, sender, False, Refusal(reasons)))
    if leaked and not s.sender_eligible:
        out += _code_changed(s)
    return out


def _code_changed(s: Situation) -> list[MailIntent]:
    """The new code of an authorized ticket, to the first address that may act on it."""
    ticket = s.ticket
    if ticket is None or not ticket.authorized or s.account_id is None:
        return []
    for contact in (ticket.requester, ticket.primary):
        if contact and s.directory.may_act(contact, s.account_id, s.service_id, ticket.requester):
            return [MailIntent(MailKind.CODE_CHANGED, contact, True, CodeChanged())]
    return []


def _loop_verdict(s: Situation, hits: list[Rule]) -> Verdict:
    names = {rule.name for rule in hits}
    copy = not names & NO_STAFF_COPY
    if s.returned is not None and (s.returned.kind is MailKind.STAFF or s.returned.reported):
        copy = False  # a report about a staff copy, or one already shown: never again
    # An auto-reply or a list that carries the valid code past someone who may not act
    # on the ticket has spread it as surely as a person would; a report of our own
    # mail has not (it quotes our mail to the MTA that returns it).
    leaked = (
        not names & REPORTS
        and _code_valid(s)
        and (not s.sender_eligible or bool(s.unshared) or s.facts.list_id)
    )
    return _verdict(
        s,
        Decision.IGNORED,
        hits,
        TicketAction.ATTACH if s.ticket else TicketAction.NONE,
        _code_changed(s) if leaked else [],
        leaked,
        staff_copy=copy,
    )


def _verdict(
    s: Situation,
    decision: Decision,
    hits: list[Rule],
    ticket_action: TicketAction,
    answers: list[MailIntent],
    rotate_code: bool = False,
    *,
    staff_copy: bool = True,
) -> Verdict:
    """The verdict; staff get every message first (unless it is our own mail come back)."""
    reasons = _reasons(hits)
    attached = ticket_action is TicketAction.ATTACH and s.ticket is not None
    staff = MailIntent(
        MailKind.STAFF,
        None,
        False,
        StaffCopy(
            decision.value,
            tuple(r.value for r in reasons),
            s.sender_role.value if s.sender_role else None,
        ),
    )
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
        unshared=_unshared(s, hits),
        mails=((staff,) if staff_copy else ()) + tuple(answers),
        rotate_code=rotate_code,
    )
