"""What must hold for every verdict, whatever the message (used by several tests)."""

from __future__ import annotations

from iqmaild.core.facts import DirectoryView, MessageFacts, PolicyConfig, TicketView
from iqmaild.core.policy import DAEMON_LOCAL_PARTS, ActionKind, TicketAction, Verdict
from iqmaild.core.tag import code_matches
from iqmaild.core.vocabulary import LOOP_REASONS, Channel, Decision


def is_loop(facts: MessageFacts) -> bool:
    return any(
        [
            facts.null_return_path,
            facts.delivery_report,
            facts.auto_submitted not in (None, "no"),
            facts.autoreply_headers,
            facts.precedence in ("bulk", "list", "junk"),
            facts.list_id,
            any(a.partition("@")[0] in DAEMON_LOCAL_PARTS for a in facts.from_addresses),
        ]
    )


def check_verdict(
    facts: MessageFacts,
    directory: DirectoryView,
    ticket: TicketView | None,
    config: PolicyConfig,
    v: Verdict,
) -> None:
    kinds = [a.kind for a in v.actions]
    assert kinds.count(ActionKind.STAFF) == 1, "staff see every message, once"
    assert len(set(v.reasons)) == len(v.reasons)
    for action in v.actions:
        if action.kind is not ActionKind.STAFF:
            assert action.recipient == facts.sender, "automatic mail goes to the From only"
        if action.include_code:  # the code goes only to who may authorize on the ticket
            assert action.recipient is not None and v.account_id is not None
            assert directory.may_act(action.recipient, v.account_id, v.service_id)

    looped = is_loop(facts)
    assert (v.decision is Decision.IGNORED) == looped
    if looped:
        assert v.reasons and set(v.reasons) <= LOOP_REASONS
        assert kinds == [ActionKind.STAFF], "never answered automatically"
        assert not v.reopen and not v.authorizes_ticket
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
    if v.decision in (Decision.AUTHORIZED, Decision.PENDING):
        # Only an eligible sender, with every participant eligible, gets here.
        sender = facts.sender
        assert sender is not None and v.account_id is not None
        assert directory.may_act(sender, v.account_id, v.service_id)
        for r in facts.recipients:
            if r not in config.desk_addresses and r != sender:
                assert directory.may_act(r, v.account_id, v.service_id), r
        assert not (config.dmarc_enforce and facts.dmarc_fail)
        assert sender not in config.admin_senders
        assert not v.unshared
    if v.decision is Decision.AUTHORIZED:
        assert ticket is not None and facts.tag is not None, "only the code authorizes"
        assert code_matches(ticket.code, facts.tag.code)
        assert ticket.account_id in (None, v.account_id)
    if v.decision is Decision.PENDING:
        assert ticket is None and facts.tag is None
        assert [a.recipient for a in v.actions if a.kind is ActionKind.AUTH_LINK] == [facts.sender]
    assert v.authorizes_ticket == bool(
        ticket and not ticket.authorized and v.decision is Decision.AUTHORIZED
    )
    assert v.reopen == bool(ticket and ticket.closed and v.decision is Decision.AUTHORIZED)
