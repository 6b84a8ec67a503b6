"""The plan of one message: every effect of its verdict, as data.

The apply step (``process/apply.py``) executes plans and nothing else decides:
what happens to the ticket, what the message row records, which mail is sent
to whom (before the rate limits and suppressions, which apply records beside
the plan), and which audit events are written.
"""

from __future__ import annotations

from dataclasses import dataclass

from iqmaild.core.mail import MailIntent
from iqmaild.core.policy import TicketAction, Verdict
from iqmaild.core.vocabulary import Decision, MailKind

TICKET_AUTHORIZATION = {
    Decision.AUTHORIZED: "authorized",
    Decision.PENDING: "pending",
    Decision.UNAUTHORIZED: "unauthorized",
    Decision.IGNORED: "unauthorized",
}


@dataclass(frozen=True)
class TicketOp:
    action: TicketAction
    number: int | None  # ATTACH: the ticket
    authorization: str  # NEW: the ticket's first state
    reopen: bool
    rotate_code: bool  # the code leaked: a new nonce, the old code stops working
    adopt_account: bool  # ATTACH: a ticket without an account takes the verdict's


@dataclass(frozen=True)
class MessageUpdate:
    decision: str
    reasons: tuple[str, ...]
    rules_hit: tuple[str, ...]
    sender_role: str | None
    account_id: str | None
    from_address: str | None
    outbox_ref: int | None  # a report about this outbox row


@dataclass(frozen=True)
class AuditEntry:
    event: str
    data: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Plan:
    verdict: Verdict
    ticket: TicketOp
    message: MessageUpdate
    mails: tuple[MailIntent, ...]
    audits: tuple[AuditEntry, ...]

    @property
    def staff_copy(self) -> bool:
        return any(m.kind is MailKind.STAFF for m in self.mails)


def plan_of(verdict: Verdict, returned_outbox_id: int | None = None) -> Plan:
    decision = verdict.decision
    reasons = tuple(r.value for r in verdict.reasons)
    ticket = TicketOp(
        action=verdict.ticket,
        number=verdict.ticket_number,
        authorization=TICKET_AUTHORIZATION[decision],
        reopen=verdict.reopen,
        rotate_code=verdict.rotate_code,
        adopt_account=bool(verdict.account_id)
        and decision in (Decision.AUTHORIZED, Decision.PENDING),
    )
    audits = [
        AuditEntry(
            "message.classified",
            (("decision", decision.value), ("reasons", reasons), ("rules", verdict.rules_hit)),
        )
    ]
    if verdict.ticket is TicketAction.NEW:
        audits.append(AuditEntry("ticket.created", (("decision", decision.value),)))
    if verdict.reopen:
        audits.append(AuditEntry("ticket.reopened"))
    if verdict.rotate_code:
        audits.append(AuditEntry("ticket.code_rotated", (("why", "code_reached_not_eligible"),)))
    return Plan(
        verdict=verdict,
        ticket=ticket,
        message=MessageUpdate(
            decision=decision.value,
            reasons=reasons,
            rules_hit=verdict.rules_hit,
            sender_role=verdict.sender_role.value if verdict.sender_role else None,
            account_id=verdict.account_id,
            from_address=verdict.sender,
            outbox_ref=returned_outbox_id,
        ),
        mails=verdict.mails,
        audits=tuple(audits),
    )
