"""Received messages, and the dead letters an operator must look at."""

from __future__ import annotations

import json

import click
from sqlalchemy import select, update

from iqmaild.cli import main
from iqmaild.cli.common import emit, run_job
from iqmaild.parse.message import body_preview, mime_defects
from iqmaild.storage.models import Message, Ticket


@main.group()
def message() -> None:
    """Received messages: list them, retry dead letters."""


@message.command("list")
@click.option(
    "--state",
    type=click.Choice(["received", "processed", "dead", "all"]),
    default="all",
    help="dead = parked after processing.max_attempts failures",
)
@click.option("--limit", type=int, default=100)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def message_list(ctx: click.Context, state: str, limit: int, as_json: bool) -> None:
    """Messages, newest first, with their decision or their last error."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.read() as session:
            query = (
                select(Message, Ticket.number)
                .outerjoin(Ticket, Ticket.id == Message.ticket_id)
                .order_by(Message.id.desc())
                .limit(limit)
            )
            if state != "all":
                query = query.where(Message.state == state)
            rows = await session.execute(query)
            return [
                {
                    "id": m.id,
                    "state": m.state,
                    "received": m.received_at.isoformat(timespec="seconds"),
                    "channel": m.channel,
                    "from": m.from_address or m.mail_from,
                    "ticket": number,
                    "decision": m.decision or "",
                    "reasons": ",".join(m.reasons or []),
                    "attempts": m.attempts,
                    "last_error": m.last_error or "",
                    "suppressed": ",".join(m.suppressed or []),
                    "size": len(m.raw),
                }
                for m, number in rows
            ]

    emit(
        run_job(ctx, work),
        as_json,
        ["id", "state", "received", "from", "ticket", "decision", "reasons", "last_error"],
    )


@message.command("show")
@click.argument("message_id", type=int)
@click.option("--raw", is_flag=True, help="The message exactly as received, to stdout")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def message_show(ctx: click.Context, message_id: int, raw: bool, as_json: bool) -> None:
    """One received message: its verdict, or (``--raw``) its bytes as received."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.read() as session:
            m = await session.get(Message, message_id)
            if m is None:
                raise LookupError(f"no message {message_id}")
            number = await session.scalar(select(Ticket.number).where(Ticket.id == m.ticket_id))
            return m, number

    m, number = run_job(ctx, work)
    if raw:
        click.get_binary_stream("stdout").write(m.raw)
        return
    data = {
        "id": m.id,
        "state": m.state,
        "received": m.received_at.isoformat(timespec="seconds"),
        "channel": m.channel,
        "mail_from": m.mail_from,
        "rcpt_to": m.rcpt_to,
        "from": m.from_address,
        "subject": m.subject,
        "ticket": number,
        "decision": m.decision,
        "reasons": m.reasons,
        "rules": m.rules_hit,
        "sender_role": m.sender_role,
        "suppressed": m.suppressed,
        "returned_outbox": m.outbox_ref,
        "defects": list(dict.fromkeys([*m.defects, *mime_defects(m.raw)])),
        "size": len(m.raw),
        "last_error": m.last_error,
        "body": body_preview(m.raw, 4000),
    }
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, default=str, indent=1))
        return
    for key, value in data.items():
        if key != "body":
            click.echo(f"{key:16} {value}")
    click.echo(f"\n{data['body']}")


@message.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.pass_context
def message_retry(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Put dead letters back in the queue (all, or the given ids)."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.transaction() as session:
            query = update(Message).where(Message.state == "dead")
            if ids:
                query = query.where(Message.id.in_(ids))
            result = await session.execute(
                query.values(state="received", attempts=0, next_attempt_at=None)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    click.echo(f"{run_job(ctx, work)} message(s) queued again; a running daemon picks them up")
