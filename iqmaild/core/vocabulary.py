"""The fixed decision and reason vocabulary.

These strings are stable: they appear alike in code, database rows, log events,
`X-IQ-*` headers, templates and tests.
"""

from __future__ import annotations

from enum import StrEnum


class Decision(StrEnum):
    AUTHORIZED = "authorized"
    PENDING = "pending"
    UNAUTHORIZED = "unauthorized"
    IGNORED = "ignored"


class Reason(StrEnum):
    UNKNOWN_SENDER = "unknown_sender"
    TECHNICAL_ADDRESS = "technical_address"
    ADDITIONAL_ADDRESS = "additional_address"
    ADMIN_PANEL = "admin_panel"
    UNSHARED_CC = "unshared_cc"
    CODE_MISSING = "code_missing"
    CODE_MISMATCH = "code_mismatch"
    UNKNOWN_TICKET = "unknown_ticket"
    MALFORMED_SENDER = "malformed_sender"
    DMARC_FAIL = "dmarc_fail"
    AMBIGUOUS_ACCOUNT = "ambiguous_account"
    AUTO_SUBMITTED = "auto_submitted"
    BOUNCE = "bounce"
    MAILING_LIST = "mailing_list"


class Role(StrEnum):
    """Role of an address in the directory (``unknown``: not in it)."""

    PRIMARY = "primary"
    SHARED = "shared"
    TECHNICAL = "technical"
    ADDITIONAL = "additional"
    UNKNOWN = "unknown"


class Channel(StrEnum):
    SMTP = "smtp"
    IMAP = "imap"
    PANEL = "panel"


class MailKind(StrEnum):
    """Every mail the daemon sends; also the outbox kind and the template name."""

    AUTH_REQUEST = "auth_request"  # the link; names the ticket without its code
    ACKNOWLEDGEMENT = "acknowledgement"  # after the click or from the panel: carries the code
    NOTICE = "notice"  # to a sender who may act on the ticket: why it was not accepted
    REFUSAL = "refusal"  # to anyone else: reveals nothing of the ticket
    CODE_CHANGED = "code_changed"  # the code reached someone not eligible: here is a new one
    STAFF = "staff"  # the message as received, with the verdict in X-IQ-* headers
    STAFF_REPLY = "staff_reply"  # a desk operator's answer (CLI/API)


AUTOMATIC_MAIL = frozenset(
    {
        MailKind.AUTH_REQUEST,
        MailKind.ACKNOWLEDGEMENT,
        MailKind.NOTICE,
        MailKind.REFUSAL,
        MailKind.CODE_CHANGED,
    }
)


class TicketState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


# Reasons that mark a loop signal: the message is stored, never answered.
LOOP_REASONS = frozenset({Reason.AUTO_SUBMITTED, Reason.BOUNCE, Reason.MAILING_LIST})
