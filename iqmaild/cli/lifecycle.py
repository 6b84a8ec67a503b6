"""Retention runs and the data subject's rights: `retention run`, `gdpr export|erase`."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path
from typing import Any

import click

from iqmaild.cli import main
from iqmaild.cli.common import CLOCK, run_job
from iqmaild.lifecycle import gdpr as g
from iqmaild.lifecycle.retention import Retention


class _Quiet:
    """The CLI prints its own result; the daemon's JSON log lines would garble it."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _actor(given: str | None) -> str:
    """Who acts, for the audit trail: --actor, else the OS user running the command."""
    if given:
        return given
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid {os.getuid()}"


def _show(counts: dict[str, int], as_json: bool, **extra: Any) -> None:
    if as_json:
        click.echo(json.dumps({**extra, "counts": counts}, indent=1))
        return
    width = max(len(k) for k in counts)
    for kind, count in counts.items():
        click.echo(f"  {kind.ljust(width)}  {count}")


ACTOR = click.option(
    "--actor", default=None, help="Who asks, for the audit trail (default: cli:<OS user>)"
)


@main.group()
def retention() -> None:
    """Retention of personal data after the [retention] periods."""


@retention.command("run")
@click.option("--dry-run", is_flag=True, help="Only count what is due; change nothing")
@click.option("--json", "as_json", is_flag=True)
@ACTOR
@click.pass_context
def retention_run(ctx: click.Context, dry_run: bool, as_json: bool, actor: str | None) -> None:
    """Purge what is due now, in batches (the daemon also does it daily by itself)."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        r = config.retention
        runner = Retention(db, CLOCK, r.periods, batch_size=r.batch_size, log=_Quiet())
        return r, await (runner.due() if dry_run else runner.run(actor=_actor(actor)))

    periods, counts = run_job(ctx, work)
    if not as_json:
        click.echo(
            f"retention{' (dry run)' if dry_run else ''}: personal data "
            f"{periods.personal_data_months} months, claims {periods.claims_years} years, "
            f"security events {periods.security_years} years; "
            + ("due now:" if dry_run else "purged or deleted:")
        )
    _show(counts, as_json, dry_run=dry_run)


@main.group()
def gdpr() -> None:
    """The data subject's rights: a copy of their data, its erasure."""


@gdpr.command("export")
@click.argument("email")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory to write (new or empty; default ./gdpr-export-<time>)",
)
@click.option("--json", "as_json", is_flag=True)
@ACTOR
@click.pass_context
def gdpr_export(
    ctx: click.Context, email: str, out: Path | None, as_json: bool, actor: str | None
) -> None:
    """Write every record about EMAIL: data.json and the raw messages as .eml."""
    target = out or Path(f"gdpr-export-{CLOCK.now().strftime('%Y%m%dT%H%M%SZ')}")

    async def work(config, db):  # type: ignore[no-untyped-def]
        address = g.subject_address(email)
        now = CLOCK.now()
        async with db.read() as session:
            found = await g.export(session, address, target, now)
        counts = found.counts()
        async with db.transaction() as session:
            session.add(g.audit_event("gdpr.export", _actor(actor), now, counts))
        return counts

    counts = run_job(ctx, work)
    if not as_json:
        click.echo(f"exported the records about {email.strip()} to {target}/:")
    _show(counts, as_json, out=str(target))


@gdpr.command("erase")
@click.argument("email")
@click.option("--dry-run", is_flag=True, help="Only count what would be erased")
@click.option("--json", "as_json", is_flag=True)
@ACTOR
@click.pass_context
def gdpr_erase(
    ctx: click.Context, email: str, dry_run: bool, as_json: bool, actor: str | None
) -> None:
    """Remove or anonymize every record about EMAIL, in one transaction.

    Tickets it opened and messages naming it are purged as retention purges
    them (numbers, dates, decisions and hashes stay for claims); its links,
    suppressions and directory entries are deleted. The directory is billing's:
    remove the address there too, or the next `directory import` brings it back.
    """

    async def work(config, db):  # type: ignore[no-untyped-def]
        address = g.subject_address(email)
        now = CLOCK.now()
        async with db.transaction() as session:
            if dry_run:
                return (await g.find(session, address)).counts()
            counts = (await g.erase(session, address, now)).counts()
            session.add(g.audit_event("gdpr.erase", _actor(actor), now, counts))
            return counts

    counts = run_job(ctx, work)
    if not as_json:
        verb = "would erase" if dry_run else "erased"
        click.echo(f"{verb} the records about {email.strip()}:")
    _show(counts, as_json, dry_run=dry_run)
    if not as_json and counts["directory_addresses"] + counts["directory_shares"]:
        click.echo(
            "note: the directory comes from billing; remove the address there as well, "
            "or the next `iqmaild directory import` adds it again"
        )
