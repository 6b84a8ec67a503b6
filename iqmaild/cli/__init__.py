"""The ``iqmaild`` command: one entry point, subcommands by concern."""

from __future__ import annotations

import click


@click.group()
@click.option(
    "--config",
    "config_path",
    envvar="IQMAILD_CONFIG",
    type=click.Path(),
    help="Path of the TOML config (default: $IQMAILD_CONFIG, /etc/iqmaild/iqmaild.toml)",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """iqmaild: the customer-service desk mail daemon."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


from iqmaild.cli import (  # noqa: E402,F401
    daemon,
    demo,
    directory,
    lifecycle,
    messages,
    queue,
    tickets,
)
