"""What must hold for every verdict, whatever the message (used by several tests)."""

from __future__ import annotations

from iqmaild.core.facts import DirectoryView, MessageFacts, PolicyConfig, TicketView
from iqmaild.core.policy import DAEMON_LOCAL_PARTS, TicketAction, Verdict
from iqmaild.core.tag import code_matches
from iqmaild.core.vocabulary import LOOP_REASONS, Channel, Decision, MailKind


def is_loop(facts: MessageFacts, config: PolicyConfig) -> bool:
    return any(
        [
            facts.null_return_path,
            facts.delivery_report,
            facts.auto_submitted not in (None, "no"),
            facts.autoreply_headers,
            facts.precedence in ("bulk", "list", "junk"),
            facts.list_id,
            any(a.partition("@")[0] in DAEMON_LOCAL_PARTS for a in facts.from_addresses),
            facts.own_mail,
            facts.seen_before,
            facts.hops > config.max_hops,
            facts.returned_outbox_id is not None,
        ]
    )


def check_verdict(
    facts: MessageFacts,
    directory: DirectoryView,
    ticket: TicketView | None,
    config: PolicyConfig,
    v: Verdict,
) -> None:
    kinds = [a.kind for a in v.mails]
    # Who opened the ticket (a new one: the sender): it decides who may act on a
    # ticket without a service.
    requester = (
        ticket.requester
        if ticket is not None and facts.channel is not Channel.PANEL
        else facts.sender
    )
    assert kinds.count(MailKind.STAFF) <= 1, "staff see a message at most once"
    ours_back = facts.own_mail or facts.seen_before or facts.hops > config.max_hops
    if not (ours_back or facts.returned_outbox_id):
        assert kinds.count(MailKind.STAFF) == 1, "staff see every message but our own returned"
    assert len(set(v.reasons)) == len(v.reasons)
    code_valid = (
        ticket is not None and facts.tag is not None and code_matches(ticket.code, facts.tag.code)
    )
    for mail in v.mails:
        if mail.kind is MailKind.STAFF:
            continue
        assert mail.recipient is not None
        if mail.kind is MailKind.CODE_CHANGED:
            assert ticket is not None and mail.recipient in (ticket.requester, ticket.primary)
        else:
            assert mail.recipient == facts.sender, "automatic mail goes to the From only"
        eligible = v.account_id is not None and directory.may_act(
            mail.recipient, v.account_id, v.service_id, requester
        )
        if mail.kind is MailKind.REFUSAL:
            assert not eligible and not mail.include_code, "a refusal names no ticket"
        if mail.kind is MailKind.NOTICE:
            assert eligible, "a notice names the ticket: only to who may act on it"
        if mail.include_code:  # the code: only to who may act, only once authorized
            assert eligible
            assert facts.channel is Channel.PANEL or (ticket is not None and ticket.authorized)
        if mail.kind is MailKind.AUTH_REQUEST:
            assert not mail.include_code, "an auto-reply to the link mail must not carry the code"

    looped = is_loop(facts, config)
    assert (v.decision is Decision.IGNORED) == looped
    if looped:
        assert v.reasons and set(v.reasons) <= LOOP_REASONS
        assert set(kinds) <= {MailKind.STAFF, MailKind.CODE_CHANGED}, "never answered"
        assert not v.reopen
        return
    assert not set(v.reasons) & LOOP_REASONS

    if facts.channel is Channel.PANEL:
        assert v.decision is Decision.AUTHORIZED and v.ticket is TicketAction.NEW
        assert v.service_id == facts.panel_service_id
        if facts.panel_account_id is not None:  # the panel always names it
            assert v.account_id == facts.panel_account_id
        return

    assert v.ticket is (TicketAction.ATTACH if ticket else TicketAction.NEW)
    assert v.ticket_number == (ticket.number if ticket else None)
    assert (v.decision is Decision.UNAUTHORIZED) == bool(v.reasons)
    sender = facts.sender
    sender_eligible = bool(
        sender and v.account_id and directory.may_act(sender, v.account_id, v.service_id, requester)
    )
    if v.decision in (Decision.AUTHORIZED, Decision.PENDING):
        # Only an eligible sender, with every participant eligible, gets here.
        assert sender is not None and sender_eligible
        for r in facts.recipients:
            if not config.is_ours(r) and r != sender:
                assert v.account_id and directory.may_take_part(r, v.account_id, v.service_id), r
        assert not facts.recipients_unreadable
        assert not (config.dmarc_enforce and facts.dmarc_fail)
        assert sender not in config.admin_senders
        assert not v.unshared
    if v.decision is Decision.AUTHORIZED:
        assert ticket is not None and code_valid, "only the code authorizes"
        assert ticket.authorized, "and only once the owner authorized the ticket"
        assert ticket.account_id in (None, v.account_id)
    if v.decision is Decision.PENDING:
        if ticket is None:
            assert facts.tag is None
            assert [a.recipient for a in v.mails if a.kind is MailKind.AUTH_REQUEST] == [sender]
        else:
            assert not ticket.authorized and code_valid
            assert set(kinds) == {MailKind.STAFF}
    assert v.reopen == bool(ticket and ticket.closed and v.decision is Decision.AUTHORIZED)
    if v.rotate_code:
        assert code_valid and (not sender_eligible or v.unshared)
    elif code_valid:
        assert sender_eligible and not v.unshared, "a leaked code must be replaced"
