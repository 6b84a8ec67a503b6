"""The authorization rules (DESIGN.md, "The authorization rules"), one table of cases.

Each case: the message facts, the ticket its tag or thread reference names (if
any), the directory and config, and the expected verdict: decision, the exact
tuple of reasons, what happens to the ticket, and every action with its
recipient and whether it carries the code. ``also`` pins further verdict fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pytest

from iqmaild.core.facts import DirectoryView, MessageFacts, PolicyConfig, ReturnedView, TicketView
from iqmaild.core.policy import (
    AUTHORIZATION_RULES,
    LOOP_RULES,
    TicketAction,
    Verdict,
    classify,
)
from iqmaild.core.tag import TagMatch
from iqmaild.core.vocabulary import Channel, Decision, MailKind, Reason, Role
from tests.core.invariants import check_verdict
from tests.core.world import (
    ADMIN_ROBOT,
    ALL_ADDRESSES,
    BOSS,
    CHIEF,
    CONFIG,
    DESK,
    DEV,
    DIRECTORY,
    EXTRA,
    MAIL_ADMIN,
    OPS,
    OWNER,
    STAFF,
    STRANGER,
    T_BETA,
    T_CLOSED,
    T_GAMMA,
    T_OPEN,
    T_ORPHAN,
    T_PENDING,
    T_WWW,
    TECH,
    TECH_SHARED,
    WRONG_CODE,
    ActionSpec,
    ack,
    code_changed,
    link,
    mail,
    notice,
    refusal,
    tag,
    tag_with,
    ticket,
)

QUIET = replace(CONFIG, notify_unknown_senders=False)
T_BY_OPS = ticket(1009, "acme", requester=OPS)  # opened by a contact with two shares
NO_DMARC = replace(CONFIG, dmarc_enforce=False)
ADMIN_HEADER = (("x-mailer", "IQ.Admin 4.2"),)

D = Decision
R = Reason
NEW, ATTACH, NONE = TicketAction.NEW, TicketAction.ATTACH, TicketAction.NONE


@dataclass(frozen=True)
class Case:
    id: str
    facts: MessageFacts
    decision: Decision
    reasons: tuple[Reason, ...]
    ticket_action: TicketAction
    actions: tuple[ActionSpec, ...]
    ticket: TicketView | None = None
    directory: DirectoryView = DIRECTORY
    config: PolicyConfig = CONFIG
    also: Mapping[str, object] = field(default_factory=dict)
    returned: ReturnedView | None = None


def loop(
    case_id: str, facts: MessageFacts, reasons: tuple[Reason, ...], rules: tuple[str, ...]
) -> Case:
    """A loop signal: ignored, no ticket, staff only."""
    return Case(case_id, facts, D.IGNORED, reasons, NONE, (STAFF,), also={"rules_hit": rules})


CASES: tuple[Case, ...] = (
    # --- no tag, eligible sender, email channel: new ticket, pending, link to From ---
    Case(
        "primary-new-pending",
        mail(OWNER),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
        also={
            "account_id": "acme",
            "service_id": None,
            "sender_role": Role.PRIMARY,
            "rules_hit": (),
            "ticket_number": None,
        },
    ),
    Case(
        "primary-of-beta-new-pending",
        mail(BOSS),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(BOSS)),
        also={"account_id": "beta"},
    ),
    Case(
        "imap-channel-same-rules",
        mail(channel=Channel.IMAP),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
    ),
    Case(
        "shared-one-service-new-ticket-gets-that-service",
        mail(MAIL_ADMIN),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(MAIL_ADMIN)),
        also={"account_id": "acme", "service_id": "acme-mail", "sender_role": Role.SHARED},
    ),
    Case(
        "shared-two-services-of-one-account-no-service",
        mail(OPS),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OPS)),
        also={"account_id": "acme", "service_id": None, "sender_role": Role.SHARED},
    ),
    Case(
        "shared-on-two-accounts-ambiguous",
        mail(DEV),
        D.UNAUTHORIZED,
        (R.AMBIGUOUS_ACCOUNT,),
        NEW,
        (STAFF, refusal(DEV)),
        also={"account_id": None, "service_id": None, "rules_hit": ("ambiguous_account",)},
    ),
    Case(
        "ambiguous-gets-notice-even-with-unknown-notices-off",
        mail(DEV),
        D.UNAUTHORIZED,
        (R.AMBIGUOUS_ACCOUNT,),
        NEW,
        (STAFF, refusal(DEV)),
        config=QUIET,
    ),
    Case(
        "technical-and-shared-share-wins",
        mail(TECH_SHARED),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(TECH_SHARED)),
        also={"service_id": "acme-mail", "sender_role": Role.SHARED},
    ),
    Case(
        "auto-submitted-no-is-a-human",
        mail(auto_submitted="no"),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
    ),
    Case(
        "precedence-first-class-is-not-a-list",
        mail(precedence="first-class"),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
    ),
    Case(
        "dmarc-fail-not-enforced",
        mail(dmarc_fail=True),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
        config=NO_DMARC,
    ),
    # --- From only technical/additional ---
    Case(
        "technical-alone",
        mail(TECH),
        D.UNAUTHORIZED,
        (R.TECHNICAL_ADDRESS,),
        NEW,
        (STAFF, refusal(TECH)),
        also={
            "account_id": "acme",
            "sender_role": Role.TECHNICAL,
            "rules_hit": ("technical_address",),
        },
    ),
    Case(
        "additional-alone",
        mail(EXTRA),
        D.UNAUTHORIZED,
        (R.ADDITIONAL_ADDRESS,),
        NEW,
        (STAFF, refusal(EXTRA)),
        also={"sender_role": Role.ADDITIONAL, "rules_hit": ("additional_address",)},
    ),
    Case(
        "technical-is-known-so-notified-with-unknown-notices-off",
        mail(TECH),
        D.UNAUTHORIZED,
        (R.TECHNICAL_ADDRESS,),
        NEW,
        (STAFF, refusal(TECH)),
        config=QUIET,
    ),
    Case(
        "technical-with-valid-code-still-unauthorized",
        mail(TECH, tag=tag(T_OPEN)),
        D.UNAUTHORIZED,
        (R.TECHNICAL_ADDRESS,),
        ATTACH,
        (STAFF, refusal(TECH), code_changed(OWNER)),
        ticket=T_OPEN,
        also={"ticket_number": 1000, "rotate_code": True},
    ),
    Case(
        "technical-with-unshared-cc",
        mail(TECH, cc=(STRANGER,)),
        D.UNAUTHORIZED,
        (R.TECHNICAL_ADDRESS, R.UNSHARED_CC),
        NEW,
        (STAFF, refusal(TECH)),
        also={"rules_hit": ("technical_address", "unshared_cc"), "unshared": (STRANGER,)},
    ),
    # --- From unknown ---
    Case(
        "unknown-sender-notified",
        mail(STRANGER),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        NEW,
        (STAFF, refusal(STRANGER)),
        also={"account_id": None, "sender_role": Role.UNKNOWN, "rules_hit": ("unknown_sender",)},
    ),
    Case(
        "unknown-sender-not-notified-when-disabled",
        mail(STRANGER),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        NEW,
        (STAFF,),
        config=QUIET,
    ),
    Case(
        "unknown-sender-cc-owner-lends-nothing",
        mail(STRANGER, cc=(OWNER,)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        NEW,
        (STAFF, refusal(STRANGER)),
    ),
    Case(
        "reply-to-and-sender-headers-never-grant",
        mail(STRANGER, headers=(("reply-to", OWNER), ("sender", OWNER))),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        NEW,
        (STAFF, refusal(STRANGER)),
        also={"sender": STRANGER},
    ),
    Case(
        "unknown-sender-with-valid-code",
        mail(STRANGER, tag=tag(T_OPEN)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        ATTACH,
        (STAFF, refusal(STRANGER), code_changed(OWNER)),
        ticket=T_OPEN,
        also={"rotate_code": True},
    ),
    Case(
        "primary-of-other-account-on-ticket",
        mail(BOSS, tag=tag(T_OPEN)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        ATTACH,
        (STAFF, refusal(BOSS), code_changed(OWNER)),
        ticket=T_OPEN,
        also={"account_id": "acme", "sender_role": Role.UNKNOWN, "rotate_code": True},
    ),
    Case(
        # Regression: a contact with shares on two accounts was "authorized" on a
        # third account's ticket (no rule hit: ambiguity hid the unknown sender).
        "two-account-contact-on-third-account-ticket",
        mail(DEV, tag=tag(T_GAMMA)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        ATTACH,
        (STAFF, refusal(DEV), code_changed(CHIEF)),
        ticket=T_GAMMA,
        also={"account_id": "gamma", "rotate_code": True},
    ),
    # --- To/Cc neither primary nor shared the ticket's service ---
    Case(
        "primary-with-unshared-cc",
        mail(OWNER, cc=(STRANGER,)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"unshared": (STRANGER,), "rules_hit": ("unshared_cc",)},
    ),
    Case(
        "cc-technical-address-is-unshared",
        mail(OWNER, cc=(TECH,)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"unshared": (TECH,)},
    ),
    Case(
        "cc-primary-of-other-account-is-unshared",
        mail(OWNER, cc=(BOSS,)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"unshared": (BOSS,)},
    ),
    Case(
        "unshared-listed-once-in-order",
        mail(OWNER, cc=(STRANGER, TECH, STRANGER)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"unshared": (STRANGER, TECH)},
    ),
    Case(
        "cc-desk-and-self-are-fine",
        mail(OWNER, cc=(DESK, OWNER)),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
        also={"unshared": ()},
    ),
    Case(
        "cc-shared-contact-while-no-service-is-fine",
        mail(OWNER, cc=(DEV, MAIL_ADMIN)),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
    ),
    Case(
        "followup-cc-contact-of-another-service",
        mail(OWNER, tag=tag(T_WWW), cc=(MAIL_ADMIN,)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_WWW,
        also={"unshared": (MAIL_ADMIN,), "service_id": "acme-www", "rotate_code": True},
    ),
    Case(
        "followup-cc-contact-of-the-tickets-service",
        mail(OWNER, tag=tag(T_WWW), cc=(DEV,)),
        D.AUTHORIZED,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_WWW,
    ),
    Case(
        "shared-new-cc-contact-of-another-service",
        mail(MAIL_ADMIN, cc=(DEV,)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        NEW,
        (STAFF, notice(MAIL_ADMIN, code=False)),
        also={"service_id": "acme-mail", "unshared": (DEV,)},
    ),
    Case(
        "shared-followup-on-service-not-shared-with-them",
        mail(MAIL_ADMIN, tag=tag(T_WWW)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        ATTACH,
        (STAFF, refusal(MAIL_ADMIN), code_changed(OWNER)),
        ticket=T_WWW,
        also={
            "unshared": (MAIL_ADMIN,),
            "rules_hit": ("unshared_sender",),
            "sender_role": Role.SHARED,
            "rotate_code": True,
        },
    ),
    Case(
        "technical-and-shared-followup-on-other-service",
        mail(TECH_SHARED, tag=tag(T_WWW)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        ATTACH,
        (STAFF, refusal(TECH_SHARED), code_changed(OWNER)),
        ticket=T_WWW,
        also={"rules_hit": ("unshared_sender",), "rotate_code": True},
    ),
    Case(
        "pending-ticket-valid-code-but-unshared-cc",
        mail(OWNER, tag=tag(T_PENDING), cc=(STRANGER,)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        ATTACH,
        (STAFF, notice(OWNER, code=False)),
        ticket=T_PENDING,
        also={"rotate_code": True},
    ),
    # --- DMARC fail (when enforced) ---
    Case(
        "dmarc-fail-enforced",
        mail(dmarc_fail=True),
        D.UNAUTHORIZED,
        (R.DMARC_FAIL,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"rules_hit": ("dmarc_fail",)},
    ),
    Case(
        "dmarc-fail-enforced-on-followup-with-code",
        mail(tag=tag(T_OPEN), dmarc_fail=True),
        D.UNAUTHORIZED,
        (R.DMARC_FAIL,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_OPEN,
    ),
    # --- the tag and the code ---
    Case(
        "followup-valid-code",
        mail(tag=tag(T_OPEN)),
        D.AUTHORIZED,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_OPEN,
        also={
            "ticket_number": 1000,
            "reopen": False,
            "rotate_code": False,
            "rules_hit": (),
        },
    ),
    Case(
        "followup-code-presented-in-uppercase",
        mail(tag=tag_with(T_OPEN, T_OPEN.code.upper())),
        D.AUTHORIZED,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_OPEN,
    ),
    Case(
        # A share on one service does not open the account's own tickets (those
        # without a service) to its holder: they are the primary's.
        "shared-contact-on-the-primarys-ticket-without-service",
        mail(MAIL_ADMIN, tag=tag(T_OPEN)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        ATTACH,
        (STAFF, refusal(MAIL_ADMIN), code_changed(OWNER)),
        ticket=T_OPEN,
        also={"rules_hit": ("unshared_sender",), "rotate_code": True},
    ),
    Case(
        "shared-contact-on-their-own-ticket-without-service",
        mail(OPS, tag=tag(T_BY_OPS)),
        D.AUTHORIZED,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_BY_OPS,
    ),
    Case(
        "two-account-contact-on-the-primarys-ticket-naming-the-account",
        mail(DEV, tag=tag(T_OPEN)),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        ATTACH,
        (STAFF, refusal(DEV), code_changed(OWNER)),
        ticket=T_OPEN,
        also={"account_id": "acme", "rotate_code": True},
    ),
    Case(
        "shared-followup-on-their-service",
        mail(DEV, tag=tag(T_WWW)),
        D.AUTHORIZED,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_WWW,
    ),
    Case(
        "wrong-code",
        mail(tag=tag_with(T_OPEN, WRONG_CODE)),
        D.UNAUTHORIZED,
        (R.CODE_MISMATCH,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_OPEN,
        also={"ticket_number": 1000, "rules_hit": ("code_mismatch",)},
    ),
    Case(
        "empty-code-is-a-wrong-code",
        mail(tag=tag_with(T_OPEN, "")),
        D.UNAUTHORIZED,
        (R.CODE_MISMATCH,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_OPEN,
    ),
    Case(
        "tag-without-code",
        mail(tag=tag_with(T_OPEN, None)),
        D.UNAUTHORIZED,
        (R.CODE_MISSING,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_OPEN,
        also={"rules_hit": ("code_missing",)},
    ),
    Case(
        "thread-reference-only-files-under-ticket",
        mail(thread_ticket=1000, subject="Re: Problem"),
        D.UNAUTHORIZED,
        (R.CODE_MISSING,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_OPEN,
        also={"ticket_number": 1000},
    ),
    Case(
        "unknown-ticket-number",
        mail(tag=TagMatch(99999, WRONG_CODE)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_TICKET,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"ticket_number": None, "rules_hit": ("unknown_ticket",)},
    ),
    Case(
        "unknown-ticket-number-from-unknown-sender",
        mail(STRANGER, tag=TagMatch(99999, None)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_TICKET, R.UNKNOWN_SENDER),
        NEW,
        (STAFF, refusal(STRANGER)),
    ),
    Case(
        "closed-ticket-valid-code-reopens",
        mail(tag=tag(T_CLOSED)),
        D.AUTHORIZED,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_CLOSED,
        also={"reopen": True},
    ),
    Case(
        # DESIGN: "follow-up to a closed ticket: the ticket reopens (decision as above)".
        "closed-ticket-wrong-code-stays-closed",
        mail(tag=tag_with(T_CLOSED, WRONG_CODE)),
        D.UNAUTHORIZED,
        (R.CODE_MISMATCH,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_CLOSED,
        also={"reopen": False},
    ),
    Case(
        "pending-ticket-valid-code-waits-for-the-click",
        mail(tag=tag(T_PENDING)),
        D.PENDING,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_PENDING,
        also={"reopen": False, "rotate_code": False},
    ),
    Case(
        "pending-ticket-wrong-code",
        mail(tag=tag_with(T_PENDING, WRONG_CODE)),
        D.UNAUTHORIZED,
        (R.CODE_MISMATCH,),
        ATTACH,
        (STAFF, notice(OWNER, code=False)),
        ticket=T_PENDING,
        also={"rotate_code": False},
    ),
    Case(
        "ticket-without-account-primary-valid-code",
        mail(tag=tag(T_ORPHAN)),
        D.PENDING,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_ORPHAN,
        also={"account_id": "acme", "rotate_code": False},
    ),
    Case(
        "ticket-without-account-two-account-contact",
        mail(DEV, tag=tag(T_ORPHAN)),
        D.UNAUTHORIZED,
        (R.AMBIGUOUS_ACCOUNT,),
        ATTACH,
        (STAFF, refusal(DEV)),
        ticket=T_ORPHAN,
    ),
    # --- marker of the admin panel ---
    Case(
        "admin-panel-header",
        mail(headers=ADMIN_HEADER),
        D.UNAUTHORIZED,
        (R.ADMIN_PANEL,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"rules_hit": ("admin_panel",)},
    ),
    Case(
        "admin-panel-header-case-insensitive",
        mail(headers=(("x-mailer", "iq.admin"),)),
        D.UNAUTHORIZED,
        (R.ADMIN_PANEL,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
    ),
    Case(
        "admin-panel-header-on-followup-with-code",
        mail(tag=tag(T_OPEN), headers=ADMIN_HEADER),
        D.UNAUTHORIZED,
        (R.ADMIN_PANEL,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_OPEN,
    ),
    Case(
        "other-mailer-is-not-admin",
        mail(headers=(("x-mailer", "Thunderbird 115"),)),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
    ),
    Case(
        "admin-pattern-only-in-its-header",
        mail(headers=(("user-agent", "IQ.Admin"),)),
        D.PENDING,
        (),
        NEW,
        (STAFF, link(OWNER)),
    ),
    Case(
        "admin-sender-address",
        mail(ADMIN_ROBOT),
        D.UNAUTHORIZED,
        (R.ADMIN_PANEL, R.UNKNOWN_SENDER),
        NEW,
        (STAFF, refusal(ADMIN_ROBOT)),
        also={"rules_hit": ("admin_panel", "unknown_sender")},
    ),
    # --- loop signals: ignored, stored, staff see it, never answered ---
    loop("null-return-path", mail(null_return_path=True), (R.BOUNCE,), ("null_return_path",)),
    loop(
        "delivery-report-from-mailer-daemon",
        mail("mailer-daemon@mx.acme.test", null_return_path=True, delivery_report=True),
        (R.BOUNCE,),
        ("null_return_path", "delivery_report", "daemon_sender"),
    ),
    loop(
        "delivery-report-alone",
        mail(STRANGER, delivery_report=True),
        (R.BOUNCE,),
        ("delivery_report",),
    ),
    loop(
        "mailer-daemon-sender",
        mail("mailer-daemon@mx.partner.test"),
        (R.BOUNCE,),
        ("daemon_sender",),
    ),
    loop("postmaster-sender", mail("postmaster@acme.test"), (R.BOUNCE,), ("daemon_sender",)),
    loop(
        "auto-replied",
        mail(auto_submitted="auto-replied"),
        (R.AUTO_SUBMITTED,),
        ("auto_submitted",),
    ),
    loop(
        "auto-generated",
        mail(auto_submitted="auto-generated"),
        (R.AUTO_SUBMITTED,),
        ("auto_submitted",),
    ),
    loop(
        "x-autoreply-headers",
        mail(autoreply_headers=True),
        (R.AUTO_SUBMITTED,),
        ("auto_submitted",),
    ),
    loop("precedence-bulk", mail(precedence="bulk"), (R.MAILING_LIST,), ("bulk_precedence",)),
    loop("precedence-list", mail(precedence="list"), (R.MAILING_LIST,), ("bulk_precedence",)),
    loop("precedence-junk", mail(precedence="junk"), (R.MAILING_LIST,), ("bulk_precedence",)),
    loop("list-id", mail(list_id=True), (R.MAILING_LIST,), ("list_id",)),
    loop(
        "several-loop-signals-in-table-order",
        mail(null_return_path=True, auto_submitted="auto-replied", list_id=True),
        (R.BOUNCE, R.AUTO_SUBMITTED, R.MAILING_LIST),
        ("null_return_path", "auto_submitted", "list_id"),
    ),
    loop(
        "loop-beats-authorization-rules",
        mail(STRANGER, list_id=True, dmarc_fail=True, headers=ADMIN_HEADER, cc=(TECH,)),
        (R.MAILING_LIST,),
        ("list_id",),
    ),
    loop(
        "loop-from-no-from",
        mail(None, auto_submitted="auto-replied"),
        (R.AUTO_SUBMITTED,),
        ("auto_submitted",),
    ),
    Case(
        "auto-reply-to-closed-ticket-attaches-without-reopening",
        mail(tag=tag(T_CLOSED), auto_submitted="auto-replied"),
        D.IGNORED,
        (R.AUTO_SUBMITTED,),
        ATTACH,
        (STAFF,),
        ticket=T_CLOSED,
        also={"ticket_number": T_CLOSED.number, "reopen": False},
    ),
    Case(
        "bounce-of-pending-ticket-never-authorizes",
        mail(tag=tag(T_PENDING), null_return_path=True),
        D.IGNORED,
        (R.BOUNCE,),
        ATTACH,
        (STAFF,),
        ticket=T_PENDING,
        also={"rotate_code": False},
    ),
    # --- panel channel ---
    Case(
        "panel-authorized-acknowledged-with-code",
        mail(channel=Channel.PANEL, panel_account_id="acme", panel_service_id="acme-www"),
        D.AUTHORIZED,
        (),
        NEW,
        (STAFF, ack(OWNER)),
        also={"account_id": "acme", "service_id": "acme-www", "rules_hit": ()},
    ),
    Case(
        "panel-without-service",
        mail(channel=Channel.PANEL, panel_account_id="acme"),
        D.AUTHORIZED,
        (),
        NEW,
        (STAFF, ack(OWNER)),
        also={"account_id": "acme", "service_id": None},
    ),
    Case(
        # Regression: a tag in a panel Subject lent the new ticket the service of
        # the ticket it named (here another account's).
        "panel-tag-of-other-ticket-keeps-panel-scope",
        mail(channel=Channel.PANEL, panel_account_id="acme", tag=tag(T_BETA)),
        D.AUTHORIZED,
        (),
        NEW,
        (STAFF, ack(OWNER)),
        ticket=T_BETA,
        also={"account_id": "acme", "service_id": None, "ticket_number": None},
    ),
    Case(
        "panel-names-the-scope-no-service-inferred",
        mail(MAIL_ADMIN, channel=Channel.PANEL, panel_account_id="acme"),
        D.AUTHORIZED,
        (),
        NEW,
        (STAFF, ack(MAIL_ADMIN)),
        also={"account_id": "acme", "service_id": None},
    ),
    Case(
        "panel-sender-not-eligible-gets-no-code",
        mail(TECH, channel=Channel.PANEL, panel_account_id="acme"),
        D.AUTHORIZED,
        (),
        NEW,
        (STAFF,),
    ),
    Case(
        "panel-primary-of-other-account-gets-no-code",
        mail(BOSS, channel=Channel.PANEL, panel_account_id="acme", panel_service_id="acme-www"),
        D.AUTHORIZED,
        (),
        NEW,
        (STAFF,),
        also={"account_id": "acme", "service_id": "acme-www"},
    ),
    # --- malformed sender ---
    Case(
        "no-from",
        mail(None),
        D.UNAUTHORIZED,
        (R.MALFORMED_SENDER,),
        NEW,
        (STAFF,),
        also={"sender": None, "sender_role": None, "rules_hit": ("malformed_sender",)},
    ),
    Case(
        "two-from-mailboxes",
        mail((OWNER, "evil@attacker.test")),
        D.UNAUTHORIZED,
        (R.MALFORMED_SENDER,),
        NEW,
        (STAFF,),
        also={"sender": None},
    ),
    Case(
        "unparseable-from",
        mail(OWNER, from_defect=True),
        D.UNAUTHORIZED,
        (R.MALFORMED_SENDER,),
        NEW,
        (STAFF,),
    ),
    Case(
        "two-from-mailboxes-with-valid-code",
        mail((OWNER, "evil@attacker.test"), tag=tag(T_PENDING)),
        D.UNAUTHORIZED,
        (R.MALFORMED_SENDER,),
        ATTACH,
        (STAFF,),
        ticket=T_PENDING,
        also={"rotate_code": True},
    ),
    Case(
        "no-from-with-thread-reference",
        mail(None, thread_ticket=1000),
        D.UNAUTHORIZED,
        (R.MALFORMED_SENDER, R.CODE_MISSING),
        ATTACH,
        (STAFF,),
        ticket=T_OPEN,
    ),
)


def _actions(verdict: Verdict) -> tuple[ActionSpec, ...]:
    return tuple((a.kind, a.recipient, a.include_code) for a in verdict.mails)


def _run(case: Case) -> Verdict:
    return classify(case.facts, case.directory, case.ticket, case.config, case.returned)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_table(case: Case) -> None:
    verdict = _run(case)
    assert verdict.decision is case.decision
    assert verdict.reasons == case.reasons
    assert verdict.ticket is case.ticket_action
    assert _actions(verdict) == case.actions
    for name, expected in case.also.items():
        assert getattr(verdict, name) == expected, name


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in (*CASES, *NEW_CASES)]
    assert len(ids) == len(set(ids))


def test_table_covers_every_reason_and_rule() -> None:
    verdicts = [_run(c) for c in (*CASES, *NEW_CASES)]
    assert {r for v in verdicts for r in v.reasons} == set(Reason)
    rules = {rule.name for rule in (*LOOP_RULES, *AUTHORIZATION_RULES)}
    assert {name for v in verdicts for name in v.rules_hit} == rules
    assert {v.decision for v in verdicts} == set(Decision)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invariants(case: Case) -> None:
    check_verdict(case.facts, case.directory, case.ticket, case.config, _run(case))


T_WWW_BY_DEV = ticket(1007, "acme", "acme-www", requester=DEV)
T_MAIL_BY_DEV = ticket(1008, "acme", "acme-mail", requester=DEV)  # DEV lost access since
BOUNCE = mail("mailer-daemon@mx.acme.test", null_return_path=True, delivery_report=True)
UNREADABLE = ("(malformed cc: Jan <jan@x.test, evil@x.test)",)

NEW_CASES: tuple[Case, ...] = (
    # --- our own mail coming back: filed under its outbox row, never a loop ---
    Case(
        "returned-report-about-a-link-mail-is-shown-once",
        replace(BOUNCE, returned_outbox_id=7),
        D.IGNORED,
        (R.BOUNCE,),
        ATTACH,
        (STAFF,),
        ticket=T_PENDING,
        returned=ReturnedView(MailKind.AUTH_REQUEST, reported=False),
        also={
            "rules_hit": ("returned_mail", "null_return_path", "delivery_report", "daemon_sender")
        },
    ),
    Case(
        "returned-report-already-shown-is-not-copied-again",
        replace(BOUNCE, returned_outbox_id=7),
        D.IGNORED,
        (R.BOUNCE,),
        ATTACH,
        (),
        ticket=T_PENDING,
        returned=ReturnedView(MailKind.AUTH_REQUEST, reported=True),
    ),
    Case(
        "returned-staff-copy-is-never-copied-to-staff",
        replace(BOUNCE, returned_outbox_id=8),
        D.IGNORED,
        (R.BOUNCE,),
        ATTACH,
        (),
        ticket=T_OPEN,
        returned=ReturnedView(MailKind.STAFF, reported=False),
    ),
    Case(
        "returned-without-null-sender-still-a-bounce",
        mail(STRANGER, returned_outbox_id=9),
        D.IGNORED,
        (R.BOUNCE,),
        NONE,
        (STAFF,),
        returned=ReturnedView(MailKind.REFUSAL, reported=False),
        also={"rules_hit": ("returned_mail",)},
    ),
    Case(
        "own-mail-came-back-is-not-a-ticket",
        mail(OWNER, own_mail=True),
        D.IGNORED,
        (R.AUTO_SUBMITTED,),
        NONE,
        (),
        also={"rules_hit": ("own_mail_returned",)},
    ),
    Case(
        "routing-loop-hop-limit",
        mail(OWNER, hops=31),
        D.IGNORED,
        (R.AUTO_SUBMITTED,),
        NONE,
        (),
        also={"rules_hit": ("hop_limit",)},
    ),
    Case(
        "hops-at-the-limit-are-fine", mail(OWNER, hops=30), D.PENDING, (), NEW, (STAFF, link(OWNER))
    ),
    Case(
        "mailing-list-carrying-the-code-replaces-it",
        mail(tag=tag(T_OPEN), list_id=True),
        D.IGNORED,
        (R.MAILING_LIST,),
        ATTACH,
        (STAFF, code_changed(OWNER)),
        ticket=T_OPEN,
        also={"rotate_code": True},
    ),
    Case(
        # An auto-generated mail with an outsider in Cc spreads the code like any mail.
        "auto-generated-mail-with-an-outsider-carrying-the-code-replaces-it",
        mail(tag=tag(T_OPEN), auto_submitted="auto-generated", cc=(STRANGER,)),
        D.IGNORED,
        (R.AUTO_SUBMITTED,),
        ATTACH,
        (STAFF, code_changed(OWNER)),
        ticket=T_OPEN,
        also={"rotate_code": True},
    ),
    Case(
        "a-bounce-quoting-our-mail-with-the-code-keeps-it",
        replace(BOUNCE, tag=tag(T_OPEN)),
        D.IGNORED,
        (R.BOUNCE,),
        ATTACH,
        (STAFF,),
        ticket=T_OPEN,
        also={"rotate_code": False},
    ),
    Case(
        "our-staff-copy-back-through-a-forwarder-is-a-loop",
        mail(OWNER, seen_before=True),
        D.IGNORED,
        (R.AUTO_SUBMITTED,),
        NONE,
        (),
        also={"rules_hit": ("message_returned",)},
    ),
    Case(
        "a-cc-to-the-desks-own-sub-addresses-is-no-outsider",
        mail(tag=tag(T_OPEN), cc=("bok+faktury@desk.test", "bok+bounce-7-abc@desk.test")),
        D.AUTHORIZED,
        (),
        ATTACH,
        (STAFF,),
        ticket=T_OPEN,
    ),
    Case(
        "auto-reply-of-the-owner-carrying-the-code-keeps-it",
        mail(tag=tag(T_OPEN), auto_submitted="auto-replied"),
        D.IGNORED,
        (R.AUTO_SUBMITTED,),
        ATTACH,
        (STAFF,),
        ticket=T_OPEN,
        also={"rotate_code": False},
    ),
    # --- recipients that cannot be read whole: participants without a grant ---
    Case(
        "unreadable-recipient-counts-as-unshared",
        mail(OWNER, recipients_unreadable=UNREADABLE),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        NEW,
        (STAFF, notice(OWNER, code=False)),
        also={"unshared": UNREADABLE},
    ),
    Case(
        "unreadable-recipient-on-followup-with-code-replaces-the-code",
        mail(tag=tag(T_OPEN), recipients_unreadable=UNREADABLE),
        D.UNAUTHORIZED,
        (R.UNSHARED_CC,),
        ATTACH,
        (STAFF, notice(OWNER, code=True)),
        ticket=T_OPEN,
        also={"rotate_code": True, "unshared": UNREADABLE},
    ),
    # --- a leaked code: the new one goes to who may act on the ticket ---
    Case(
        "leaked-code-new-code-to-the-requester",
        mail(STRANGER, tag=tag(T_WWW_BY_DEV)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        ATTACH,
        (STAFF, refusal(STRANGER), code_changed(DEV)),
        ticket=T_WWW_BY_DEV,
        also={"rotate_code": True},
    ),
    Case(
        "leaked-code-requester-lost-access-new-code-to-the-primary",
        mail(STRANGER, tag=tag(T_MAIL_BY_DEV)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        ATTACH,
        (STAFF, refusal(STRANGER), code_changed(OWNER)),
        ticket=T_MAIL_BY_DEV,
        also={"rotate_code": True},
    ),
    Case(
        "leaked-code-of-a-pending-ticket-mails-no-code",
        mail(STRANGER, tag=tag(T_PENDING)),
        D.UNAUTHORIZED,
        (R.UNKNOWN_SENDER,),
        ATTACH,
        (STAFF, refusal(STRANGER)),
        ticket=T_PENDING,
        also={"rotate_code": True},
    ),
    Case(
        "reply-to-the-link-mail-carries-no-code-and-authorizes-nothing",
        mail(tag=tag_with(T_PENDING, None), thread_ticket=T_PENDING.number),
        D.UNAUTHORIZED,
        (R.CODE_MISSING,),
        ATTACH,
        (STAFF, notice(OWNER, code=False)),
        ticket=T_PENDING,
    ),
)


@pytest.mark.parametrize("case", NEW_CASES, ids=[c.id for c in NEW_CASES])
def test_returned_mail_loops_and_leaks(case: Case) -> None:
    test_rule_table(case)
    test_invariants(case)


TICKETS = (T_OPEN, T_WWW, T_CLOSED, T_PENDING, T_GAMMA, T_ORPHAN, T_BETA, T_WWW_BY_DEV)
PEOPLE = (*ALL_ADDRESSES, STRANGER, ADMIN_ROBOT)
CCS = ((), (STRANGER,), (TECH,), (DEV,), (MAIL_ADMIN,), (OWNER, DESK), (BOSS,))


def _sweep() -> list[tuple[MessageFacts, TicketView | None]]:
    """Every sender on every ticket with every kind of tag, CC and channel."""
    out: list[tuple[MessageFacts, TicketView | None]] = []
    for sender in PEOPLE:
        for cc in CCS:
            out.append((mail(sender, cc=cc), None))
            out.append((mail(sender, cc=cc, tag=TagMatch(99999, None)), None))
            for account in ("acme", "beta", None):
                for service in ("acme-www", None):
                    panel = mail(
                        sender,
                        cc=cc,
                        channel=Channel.PANEL,
                        panel_account_id=account,
                        panel_service_id=service,
                    )
                    out.append((panel, None))
            for t in TICKETS:
                for found in (tag(t), tag_with(t, WRONG_CODE), tag_with(t, None), None):
                    out.append((mail(sender, cc=cc, tag=found, thread_ticket=t.number), t))
                out.append((mail(sender, cc=cc, tag=tag(t), list_id=True), t))
                out.append((mail(sender, cc=cc, tag=tag(t), recipients_unreadable=UNREADABLE), t))
    return out


@pytest.mark.parametrize("config", [CONFIG, QUIET], ids=["notify", "quiet"])
def test_invariants_over_the_whole_directory(config: PolicyConfig) -> None:
    sweep = _sweep()
    assert len(sweep) > 2000
    for facts, view in sweep:
        verdict = classify(facts, DIRECTORY, view, config)
        check_verdict(facts, DIRECTORY, view, config, verdict)


def test_identity_is_the_from_mailbox_only() -> None:
    names = {f.name for f in dataclasses.fields(MessageFacts)}
    assert not names & {"reply_to", "sender_header", "envelope_from", "mail_from"}
    facts = mail(STRANGER, headers=(("reply-to", OWNER), ("sender", OWNER)))
    assert facts.sender == STRANGER
    assert mail((OWNER, STRANGER)).sender is None
    assert mail(OWNER, from_defect=True).sender is None


def test_only_eligible_senders_hear_of_the_ticket() -> None:
    """A notice (naming the ticket) only to who may act on it; everyone else a refusal."""
    checked = 0
    for case in CASES:
        v = _run(case)
        if v.decision is not Decision.UNAUTHORIZED or case.facts.sender is None:
            continue
        requester = case.ticket.requester if case.ticket else case.facts.sender
        eligible = v.account_id is not None and case.directory.may_act(
            case.facts.sender, v.account_id, v.service_id, requester
        )
        for intent in v.mails:
            if intent.kind in (MailKind.NOTICE, MailKind.REFUSAL):
                assert intent.kind is (MailKind.NOTICE if eligible else MailKind.REFUSAL), case.id
                assert not intent.include_code or (case.ticket and case.ticket.authorized)
                checked += 1
    assert checked > 20


def test_classify_is_deterministic() -> None:
    for case in CASES:
        assert _run(case) == _run(case)


def test_rule_names_are_unique_and_stable() -> None:
    names = [rule.name for rule in (*LOOP_RULES, *AUTHORIZATION_RULES)]
    assert len(names) == len(set(names))
    assert all(name.isidentifier() and name == name.lower() for name in names)
