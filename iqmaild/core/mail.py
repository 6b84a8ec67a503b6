"""Mail intents: what to send, to whom, with which typed template context.

One `MailKind` names a mail alike in the core, the outbox and the templates
(``templates/mail/<lang>/<kind>.txt``); the template sees the fields of the
kind's context, plus ``ticket``, ``recipient``, ``desk_address`` and
``panel_url``. What only the apply step can make (a link's fresh token) is
added there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from iqmaild.core.vocabulary import MailKind


@dataclass(frozen=True)
class AuthRequest:
    """The link itself is made when the plan is applied (a fresh random token)."""


@dataclass(frozen=True)
class Acknowledgement:
    via: Literal["link", "panel"]


@dataclass(frozen=True)
class Notice:
    reasons: tuple[str, ...]
    unshared: tuple[str, ...]
    ticket_authorized: bool
    code_changed: bool


@dataclass(frozen=True)
class Refusal:
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class CodeChanged:
    pass


@dataclass(frozen=True)
class StaffCopy:
    decision: str
    reasons: tuple[str, ...]
    sender_role: str | None


@dataclass(frozen=True)
class StaffReply:
    body: str


MailContext = (
    AuthRequest | Acknowledgement | Notice | Refusal | CodeChanged | StaffCopy | StaffReply
)

CONTEXT_OF: dict[MailKind, type[Any]] = {
    MailKind.AUTH_REQUEST: AuthRequest,
    MailKind.ACKNOWLEDGEMENT: Acknowledgement,
    MailKind.NOTICE: Notice,
    MailKind.REFUSAL: Refusal,
    MailKind.CODE_CHANGED: CodeChanged,
    MailKind.STAFF: StaffCopy,
    MailKind.STAFF_REPLY: StaffReply,
}


@dataclass(frozen=True)
class MailIntent:
    kind: MailKind
    recipient: str | None  # None: the staff address
    include_code: bool
    context: MailContext

    def __post_init__(self) -> None:
        if not isinstance(self.context, CONTEXT_OF[self.kind]):
            raise TypeError(f"{self.kind} needs a {CONTEXT_OF[self.kind].__name__} context")

    @property
    def reveals_ticket(self) -> bool:
        """A refusal names no ticket: it goes to someone who may not act on it."""
        return self.kind is not MailKind.REFUSAL

    def template_vars(self) -> dict[str, Any]:
        values = {f.name: getattr(self.context, f.name) for f in dataclasses.fields(self.context)}
        if self.kind is MailKind.NOTICE:
            values["includes_code"] = self.include_code
        return values
