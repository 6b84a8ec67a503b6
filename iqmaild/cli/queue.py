"""The outbox commands, like Postfix's queue tools: list, flush, retry, hold,
release, delete. The running daemon needs no signal: it polls for due rows."""

from __future__ import annotations

import click

from iqmaild.cli import main
from iqmaild.cli.common import CLOCK, Fail, emit, run_job
from iqmaild.deliver import queue


@main.group()
def outbox() -> None:
    """The persistent outbox: list, flush, retry, hold, release, delete."""


@outbox.command("list")
@click.option("--state", type=click.Choice([*queue.STATES, "all"]), default="all")
@click.option("--limit", type=int, default=100)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def outbox_list(ctx: click.Context, state: str, limit: int, as_json: bool) -> None:
    """Outbound mail, newest first; `--state suppressed`: mail a rule stopped."""
    rows = run_job(ctx, lambda config, db: queue.list_rows(db, state, limit, CLOCK.now()))
    if state == "suppressed":
        columns = ["id", "ticket", "kind", "recipient", "rule", "message", "created"]
    else:
        columns = ["id", "ticket", "kind", "state", "recipient", "attempts", "next_attempt"]
        columns.append("last_error")
    emit(rows, as_json, columns)


@outbox.command("flush")
@click.pass_context
def outbox_flush(ctx: click.Context) -> None:
    """Make every deferred row due now; the daemon sends them at once."""
    count = run_job(ctx, lambda config, db: queue.flush(db, CLOCK.now()))
    click.echo(f"{count} deferred message(s) due now")


def _report(outcome: queue.Outcome, done: str) -> None:
    click.echo(f"{len(outcome.changed)} message(s) {done}")
    for row_id, why in outcome.skipped.items():
        click.echo(f"iqmaild: outbox {row_id}: {why}", err=True)
    if outcome.skipped:
        raise SystemExit(1)


@outbox.command("retry")
@click.argument("ids", nargs=-1, type=int)
@click.pass_context
def outbox_retry(ctx: click.Context, ids: tuple[int, ...]) -> None:
    """Send failed or deferred rows now (without IDs: every failed row).

    A link mail that failed for good had its link spent: `ticket resend-link N`
    mails a new one.
    """
    if not ids:
        count, left = run_job(ctx, lambda config, db: queue.retry_all_failed(db, CLOCK.now()))
        click.echo(f"{count} message(s) queued again")
        if left:
            click.echo(
                f"iqmaild: {left} failed link mail(s) left: `ticket resend-link N` for new links",
                err=True,
            )
        return
    _report(run_job(ctx, lambda config, db: queue.act(db, "retry", ids, CLOCK.now())), "queued")


def _action(name: str, done: str, doc: str) -> None:
    @click.argument("ids", nargs=-1, type=int, required=True)
    @click.pass_context
    def command(ctx: click.Context, ids: tuple[int, ...]) -> None:
        if not ids:
            raise Fail("name at least one outbox row")
        _report(run_job(ctx, lambda config, db: queue.act(db, name, ids, CLOCK.now())), done)

    command.__doc__ = doc
    outbox.command(name)(command)


_action("hold", "held", "Keep queued or deferred rows from being sent until `release`.")
_action("release", "released", "Queue held rows again, due now.")
_action(
    "delete",
    "deleted",
    "Never send these rows (queued, deferred, held or failed); a link mail's link is spent.",
)
