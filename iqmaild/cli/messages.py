"""Received messages, and the dead letters an operator must look at."""

from __future__ import annotations

import click
from sqlalchemy import select, update

from iqmaild.cli import main
from iqmaild.cli.common import emit, run_job
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
                    "size": len(m.raw),
                }
                for m, number in rows
            ]

    emit(
        run_job(ctx, work),
        as_json,
        ["id", "state", "received", "from", "ticket", "decision", "reasons", "last_error"],
    )


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
