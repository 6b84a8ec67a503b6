"""Directory administration: accounts, addresses, services, shares, import."""

from __future__ import annotations

import json
from pathlib import Path

import click

from iqmaild.cli import main
from iqmaild.cli.common import CLOCK, Fail, emit, run_job
from iqmaild.storage import directory as d
from iqmaild.storage import directory_sync as sync
from iqmaild.storage.models import AuditEvent


@main.group()
def account() -> None:
    """Accounts and their primary address."""


@account.command("add")
@click.argument("account_id")
@click.option("--primary", required=True, help="The account's main address")
@click.option("--name", default=None)
@click.option("--lang", type=click.Choice(["pl", "en"]), default=None)
@click.pass_context
def account_add(
    ctx: click.Context, account_id: str, primary: str, name: str | None, lang: str | None
) -> None:
    """Add an account, or change its primary address, name or language."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.transaction() as session:
            await d.upsert_account(session, account_id, primary, name, lang, now=CLOCK.now())

    run_job(ctx, work)
    click.echo(f"account {account_id}: primary {primary}")


@account.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def account_list(ctx: click.Context, as_json: bool) -> None:
    """Accounts with their addresses and services."""
    from sqlalchemy import select

    from iqmaild.storage.models import Account, Address, Service

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.read() as session:
            rows = []
            for acc in await session.scalars(select(Account).order_by(Account.id)):
                addresses = await session.execute(
                    select(Address.email, Address.role).where(Address.account_id == acc.id)
                )
                services = await session.scalars(
                    select(Service.id).where(Service.account_id == acc.id)
                )
                rows.append(
                    {
                        "id": acc.id,
                        "name": acc.name,
                        "lang": acc.lang,
                        "addresses": {e: r for e, r in addresses},
                        "services": list(services),
                    }
                )
            return rows

    emit(run_job(ctx, work), as_json, ["id", "name", "lang", "addresses", "services"])


@main.group()
def address() -> None:
    """Technical and additional addresses (they never authorize)."""


@address.command("add")
@click.argument("account_id")
@click.argument("email")
@click.option("--role", type=click.Choice(["technical", "additional"]), required=True)
@click.pass_context
def address_add(ctx: click.Context, account_id: str, email: str, role: str) -> None:
    """Declare a technical or additional address of an account."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.transaction() as session:
            await d.add_address(session, account_id, email, role)

    run_job(ctx, work)
    click.echo(f"account {account_id}: {role} {email}")


@main.group()
def service() -> None:
    """Services of an account."""


@service.command("add")
@click.argument("account_id")
@click.argument("service_id")
@click.option("--name", default=None)
@click.pass_context
def service_add(ctx: click.Context, account_id: str, service_id: str, name: str | None) -> None:
    """Add a service to an account."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.transaction() as session:
            await d.add_service(session, account_id, service_id, name)

    run_job(ctx, work)
    click.echo(f"account {account_id}: service {service_id}")


@main.group()
def share() -> None:
    """Service sharing: contacts allowed to act on one service."""


@share.command("grant")
@click.argument("service_id")
@click.argument("email")
@click.pass_context
def share_grant(ctx: click.Context, service_id: str, email: str) -> None:
    """Share a service with a contact."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.transaction() as session:
            return await d.grant_share(session, service_id, email)

    added = run_job(ctx, work)
    click.echo(f"service {service_id}: {'shared with' if added else 'already shared with'} {email}")


@share.command("revoke")
@click.argument("service_id")
@click.argument("email")
@click.pass_context
def share_revoke(ctx: click.Context, service_id: str, email: str) -> None:
    """Take a share back."""

    async def work(config, db):  # type: ignore[no-untyped-def]
        async with db.transaction() as session:
            return await d.revoke_share(session, service_id, email)

    removed = run_job(ctx, work)
    click.echo(f"service {service_id}: {'revoked' if removed else 'was not shared with'} {email}")


@main.group()
def directory() -> None:
    """The whole directory at once."""


class _DryRun(Exception):
    """Raised inside the transaction so that a dry run changes nothing."""


@directory.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--replace",
    is_flag=True,
    help="Make the directory equal to the file: remove what it no longer has.",
)
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--summary", is_flag=True, help="Only the counts, not every line of the diff.")
@click.pass_context
def directory_import(
    ctx: click.Context, file: Path, replace: bool, dry_run: bool, summary: bool
) -> None:
    """Import a directory JSON file (README, "Directory JSON"), in one transaction.

    Without --replace: upsert (nothing is removed). With --replace: the
    directory becomes the file, and the diff is printed (+ added, ~ changed,
    - removed accounts, addresses, services, shares).
    """

    emit = None if summary else click.echo

    async def work(config, db):  # type: ignore[no-untyped-def]
        try:
            with file.open("rb") as stream:
                async with db.transaction() as session:
                    accounts = sync.read_accounts(stream)
                    if replace:
                        diff = await sync.replace_directory(session, accounts, CLOCK.now(), emit)
                        result = diff.summary()
                        data = {"file": file.name, "counts": diff.counts}
                        session.add(
                            AuditEvent(
                                ts=CLOCK.now(), event="directory.replaced", actor="cli", data=data
                            )
                        )
                    else:
                        counts = {"accounts": 0, "addresses": 0, "services": 0, "shares": 0}
                        for part in sync.chunks(accounts):
                            data = {"accounts": [a.model_dump(exclude_unset=True) for a in part]}
                            done = await d.import_directory(session, data, CLOCK.now())
                            for key, value in done.items():
                                counts[key] += value
                        result = "imported " + ", ".join(f"{v} {k}" for k, v in counts.items())
                    if dry_run:
                        raise _DryRun(result)
        except _DryRun as dry:
            return f"dry run, nothing changed: {dry}"
        except OSError as exc:
            raise Fail(f"{file}: {exc}") from None
        return result

    click.echo(run_job(ctx, work))


@directory.command("schema")
def directory_schema() -> None:
    """Print the JSON Schema of a directory file."""
    click.echo(json.dumps(sync.DirectoryFile.model_json_schema(), indent=1))
