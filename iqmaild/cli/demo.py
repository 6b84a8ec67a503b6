"""``iqmaild demo``: the daemon on SQLite with a demo directory and a mail capture.

A newcomer sees the whole path at once: a sample message from a primary
address goes in over SMTP, and the authorization mail it causes lands as an
.eml file under the demo directory, with the link printed to follow.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import smtplib
import tomllib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path

import click

from iqmaild import logs
from iqmaild.cli import main
from iqmaild.cli.common import CLOCK, Fail
from iqmaild.config import load_config

DEMO_DIRECTORY = {
    "accounts": [
        {
            "id": "demo-1",
            "primary": "klient@example.com",
            "name": "Przykładowa Firma",
            "lang": "pl",
            "technical": ["admin@example.com"],
            "services": [
                {"id": "www-1", "name": "Hosting WWW", "shared_with": ["webmaster@example.net"]}
            ],
        },
        {"id": "demo-2", "primary": "owner@example.org", "name": "Example Ltd", "lang": "en"},
    ]
}


def _write_config(base: Path, smtp_port: int, http_port: int, relay_port: int) -> Path:
    """Write the demo config; a rerun keeps its key (ticket codes stay valid)."""
    path = base / "iqmaild.toml"
    key, token = secrets.token_urlsafe(48), secrets.token_urlsafe(24)
    if path.exists():
        try:
            old = tomllib.loads(path.read_text(encoding="utf-8"))
            key = old["security"]["secret_key"]
            token = old["http"]["panel_token"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    path.write_text(
        f"""# Demo configuration written by `iqmaild demo`; see config.example.toml.
[database]
url = "sqlite+aiosqlite:///{(base / "iqmaild.db").resolve()}"

[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "localhost"
desk_addresses = ["bok@demo.test"]

[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
panel_token = "{token}"

[outbound]
relay = "127.0.0.1:{relay_port}"
from = "BOK Demo <bok@demo.test>"
staff_address = "staff@demo.test"
retry_base_seconds = 2.0

[tickets]
tag_prefix = "IQ.pl"
number_start = 23328

[security]
secret_key = "{key}"
""",
        encoding="utf-8",
    )
    return path


def _sample(smtp_port: int) -> None:
    msg = EmailMessage()
    msg["From"] = "Jan Kowalski <klient@example.com>"
    msg["To"] = "bok@demo.test"
    msg["Subject"] = "Nie działa poczta na koncie"
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content("Dzień dobry,\nod rana nie mogę wysłać poczty.\nPozdrawiam, Jan\n")
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as client:
        client.send_message(msg)


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo"),
    show_default=True,
    help="Where the demo keeps its files",
)
@click.option("--smtp-port", type=int, default=2526, show_default=True)
@click.option("--http-port", type=int, default=8026, show_default=True)
@click.option(
    "--relay-port",
    type=int,
    default=2527,
    show_default=True,
    help="The local capture that stands in for the MTA",
)
@click.option("--sample/--no-sample", default=True, help="Send one sample message at start")
@click.option("--exit-after-sample", is_flag=True, help="Stop once the sample's mail is captured")
def demo(
    directory: Path,
    smtp_port: int,
    http_port: int,
    relay_port: int,
    sample: bool,
    exit_after_sample: bool,
) -> None:
    """Set up and run the daemon on SQLite with a demo directory and a mail capture."""
    from iqmaild.deliver.capture import CaptureRelay
    from iqmaild.service import Daemon
    from iqmaild.storage import schema
    from iqmaild.storage.db import Database
    from iqmaild.storage.directory import import_directory

    directory.mkdir(parents=True, exist_ok=True)
    config = load_config(_write_config(directory, smtp_port, http_port, relay_port))
    logs.configure("info")
    mail_dir = directory / "mail"

    def say(text: str) -> None:
        click.secho(f"demo: {text}", fg="green", err=True)

    async def run() -> None:
        db = Database(config.database.url)
        await schema.upgrade(db)
        async with db.transaction() as session:
            await import_directory(session, DEMO_DIRECTORY, CLOCK.now())
        await db.dispose()
        (directory / "directory.json").write_text(
            json.dumps(DEMO_DIRECTORY, indent=2, ensure_ascii=False), "utf-8"
        )
        done = asyncio.Event()

        def captured(item, path: Path) -> None:  # type: ignore[no-untyped-def]
            say(f"captured mail to {', '.join(item.rcpt_tos)} -> {path}")
            text = item.content.decode("utf-8", "replace")
            if "/authorize/" in text:
                import re

                link = re.search(r"http://[^\s\"<>]+/authorize/[A-Za-z0-9_-]+", text)
                if link:
                    say(f"authorization link: {link.group(0)} (open it and press the button)")
                done.set()

        relay = CaptureRelay(directory=mail_dir, on_message=captured)
        await relay.start("127.0.0.1", relay_port)
        daemon = Daemon(config)
        await daemon.start()
        say(
            f"SMTP 127.0.0.1:{daemon.smtp_port} (desk bok@demo.test), "
            f"HTTP http://127.0.0.1:{daemon.http_port}, config {directory / 'iqmaild.toml'}"
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            if sample:
                await asyncio.to_thread(_sample, daemon.smtp_port)
                say("sent a sample message from klient@example.com (the account's primary address)")
            if exit_after_sample:
                waiters = [asyncio.ensure_future(e.wait()) for e in (done, stop)]
                finished, pending = await asyncio.wait(
                    waiters, timeout=60, return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in pending:
                    waiter.cancel()
                if not finished:
                    raise TimeoutError
            else:
                say("running; Ctrl-C stops. Try: swaks/mail to bok@demo.test on this port")
                await stop.wait()
        finally:
            await daemon.stop()
            await relay.stop()

    try:
        asyncio.run(run())
    except OSError as exc:
        raise Fail(
            f"cannot start the demo: {exc} (a port in use? see --smtp-port, "
            "--http-port, --relay-port)"
        ) from None
    except TimeoutError:
        raise Fail("the sample's authorization mail did not arrive within 60 s") from None
