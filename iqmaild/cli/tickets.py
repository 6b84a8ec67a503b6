"""Ticket commands for desk operators (the outbox's are in cli/queue.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from sqlalchemy import select, update

from iqmaild.apply import tickets
from iqmaild.apply.effects import Writes, audit_row
from iqmaild.cli import main
from iqmaild.cli.common import CLOCK, Fail, emit, run_job
from iqmaild.core.mail import AuthRequest, MailIntent, StaffReply
from iqmaild.core.vocabulary import MailKind, TicketState
from iqmaild.deliver import queue
from iqmaild.deliver.compose import ThreadInfo
from iqmaild.parse.message import body_preview, thread_of
from iqmaild.storage.directory import view_for
from iqmaild.storage.models import AuditEvent, AuthToken, Message, Service, Ticket


def _applier(config: Any) -> Any:
    from iqmaild.service import build

    return build(config, clock=CLOCK).applier


def _audit(session: Any, event: str, ticket: Ticket, **data: Any) -> None:
    session.add(
        AuditEvent(**audit_row(event, CLOCK.now(), ticket_id=ticket.id, actor="cli", **data))
    )


def _ticket_row(t: Ticket) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state,
        "authorization": t.authorization,
        "account": t.account_id or "",
        "service": t.service_id or "",
        "requester": t.requester or "",
        "channel": t.channel,
        "subject": t.subject,
        "updated": t.updated_at.isoformat(timespec="seconds"),
    }


async def _ticket(session: Any, number: int) -> Ticket:
    ticket = await tickets.by_number(session, number)
    if ticket is None:
        raise LookupError(f"no ticket {number}")
    return ticket


@main.group()
def ticket() -> None:
    """Tickets: list, show, close, reopen, set-service, reply."""


@ticket.command("list")
@click.option("--state", type=click.Choice(["open", "closed", "all"]), default="all")
@click.option("--limit", type=int, default=100)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ticket_list(ctx: click.Context, state: str, limit: int, as_json: bool) -> None:
    """Newest tickets first."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.read() as session:
            query = select(Ticket).order_by(Ticket.number.desc()).limit(limit)
            if state != "all":
                query = query.where(Ticket.state == state)
            return [_ticket_row(t) for t in await session.scalars(query)]

    emit(
        run_job(ctx, work),
        as_json,
        ["number", "state", "authorization", "account", "requester", "subject"],
    )


@ticket.command("show")
@click.argument("number", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ticket_show(ctx: click.Context, number: int, as_json: bool) -> None:
    """A ticket with its messages and their decisions."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.read() as session:
            t = await _ticket(session, number)
            messages = await session.scalars(
                select(Message).where(Message.ticket_id == t.id).order_by(Message.id)
            )
            out = _ticket_row(t)
            out["messages"] = [
                {
                    "id": m.id,
                    "received": m.received_at.isoformat(timespec="seconds"),
                    "channel": m.channel,
                    "from": m.from_address,
                    "subject": m.subject,
                    "decision": m.decision,
                    "reasons": m.reasons,
                    "sender_role": m.sender_role,
                    "body": body_preview(m.raw, 2000),
                }
                for m in messages
            ]
            return out

    data = run_job(ctx, work)
    if as_json:
        emit(data, True, [])  # type: ignore[arg-type]
        return
    for key in ("number", "state", "authorization", "account", "service", "requester", "subject"):
        click.echo(f"{key:14} {data[key]}")
    for m in data["messages"]:
        reasons = ",".join(m["reasons"]) or "-"
        click.echo(
            f"\n#{m['id']} {m['received']} {m['channel']} from {m['from']} "
            f"[{m['decision']}: {reasons}]\n{m['body'].strip()[:1000]}"
        )


def _set_state(state: TicketState):  # type: ignore[no-untyped-def]
    @click.argument("number", type=int)
    @click.pass_context
    def command(ctx: click.Context, number: int) -> None:
        async def work(config, db):  # type: ignore[no-untyped-def]
            async with db.transaction() as session:
                t = await _ticket(session, number)
                changed = tickets.set_state(t, state, CLOCK.now())
                if changed:
                    _audit(session, f"ticket.{state.value}", t)
                return changed

        changed = run_job(ctx, work)
        click.echo(f"ticket {number} {state.value}" + ("" if changed else " (no change)"))

    return command


ticket.command("close", help="Close a ticket (a follow-up reopens it).")(
    _set_state(TicketState.CLOSED)
)
ticket.command("reopen", help="Reopen a closed ticket.")(_set_state(TicketState.OPEN))


@ticket.command("set-service")
@click.argument("number", type=int)
@click.argument("service_id")
@click.pass_context
def ticket_set_service(ctx: click.Context, number: int, service_id: str) -> None:
    """Scope a ticket to one service of its account."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.transaction() as session:
            t = await _ticket(session, number)
            service = await session.get(Service, service_id)
            if service is None:
                raise LookupError(f"no service {service_id}")
            if t.account_id and service.account_id != t.account_id:
                raise LookupError(f"service {service_id} is not of account {t.account_id}")
            t.account_id, t.service_id = service.account_id, service.id
            t.updated_at = CLOCK.now()
            _audit(session, "ticket.service_set", t, service=service_id)

    run_job(ctx, work)
    click.echo(f"ticket {number}: service {service_id}")


@ticket.command("reply")
@click.argument("number", type=int)
@click.option(
    "--body-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="UTF-8 text of the reply ('-' not accepted)",
)
@click.pass_context
def ticket_reply(ctx: click.Context, number: int, body_file: Path) -> None:
    """Send a desk reply to the ticket's requester, tag preserved, through the outbox."""
    try:
        body = body_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise Fail(f"{body_file}: {exc}") from None

    async def work(config, db):  # type: ignore[no-untyped-def]
        applier = _applier(config)
        async with db.transaction() as session:
            t = await _ticket(session, number)
            if not t.requester:
                raise LookupError(f"ticket {number} has no requester address to reply to")
            directory = await view_for(session, [t.requester])
            # The code goes only to who may act, and only once the ticket is authorized.
            may_see_code = (
                t.authorization == "authorized"
                and bool(t.account_id)
                and directory.may_act(t.requester, t.account_id or "", t.service_id, t.requester)
            )
            last = await session.scalar(
                select(Message)
                .where(Message.ticket_id == t.id, Message.from_address == t.requester)
                .order_by(Message.id.desc())
                .limit(1)
            )
            thread = ThreadInfo(*thread_of(last.raw)) if last else None
            intent = MailIntent(MailKind.STAFF_REPLY, t.requester, may_see_code, StaffReply(body))
            writes = Writes()
            applier.queue_customer(
                writes, intent, t, thread, last.id if last else None, t.lang, CLOCK.now()
            )
            await applier.write(session, writes)
            _audit(session, "ticket.replied", t, chars=len(body))
            return t.requester

    recipient = run_job(ctx, work)
    click.echo(f"ticket {number}: reply to {recipient} queued")


async def reissue_link(config: Any, db: Any, number: int) -> str:
    """A new link for a ticket still waiting for its owner; every earlier one is spent."""
    applier = _applier(config)
    async with db.transaction() as session:
        t = await _ticket(session, number)
        if t.authorization == "authorized":
            raise LookupError(f"ticket {number} is already authorized")
        if not t.requester or not t.account_id:
            raise LookupError(f"ticket {number} has no requester who could authorize it")
        directory = await view_for(session, [t.requester])
        if not directory.may_act(t.requester, t.account_id, t.service_id, t.requester):
            raise LookupError(f"{t.requester} may not act on ticket {number}")
        await session.execute(
            update(AuthToken)
            .where(AuthToken.ticket_id == t.id, AuthToken.used_at.is_(None))
            .values(used_at=CLOCK.now())
        )
        # Link mails not sent yet would carry a spent link: the new one replaces them.
        superseded = await queue.supersede_links(session, t.id, CLOCK.now())
        last = await session.scalar(
            select(Message)
            .where(Message.ticket_id == t.id, Message.from_address == t.requester)
            .order_by(Message.id.desc())
            .limit(1)
        )
        intent = MailIntent(MailKind.AUTH_REQUEST, t.requester, False, AuthRequest())
        thread = ThreadInfo(*thread_of(last.raw)) if last else None
        # An operator's decision: no rate limit stands in its way.
        writes = Writes()
        applier.queue_customer(
            writes, intent, t, thread, last.id if last else None, t.lang, CLOCK.now()
        )
        await applier.write(session, writes)
        _audit(session, "authlink.reissued", t, superseded=superseded)
        return t.requester


@ticket.command("resend-link")
@click.argument("number", type=int)
@click.pass_context
def ticket_resend_link(ctx: click.Context, number: int) -> None:
    """Mail a new authorization link to the ticket's requester; earlier links are spent."""
    recipient = run_job(ctx, lambda config, db: reissue_link(config, db, number))
    click.echo(f"ticket {number}: new link to {recipient} queued; earlier links no longer work")
