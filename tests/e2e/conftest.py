"""Fixtures of the end-to-end tests: real Dovecot, Postfix, daemon and Chromium.

Per session: one Dovecot (the customers' and the staff's mailboxes; emptied
before every test). Per test: a private Postfix instance and a fresh daemon
(its own SQLite database, migrated and loaded with ``iqmaild migrate`` and
``iqmaild directory import``), wired as on a real desk:

    customer --SMTP--> Postfix MX --smtp: or lmtp: transport--> iqmaild
    iqmaild --outbound.relay--> Postfix (2nd smtpd) --LMTP--> Dovecot <--IMAP-- tests

The tests are synchronous (subprocesses, smtplib, imaplib, Playwright's sync
API): nothing here shares an event loop with pytest-asyncio.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import servers
from tests.e2e.mail import Mailboxes, send_via_mx
from tests.e2e.servers import DeskDaemon, Dovecot, Postfix

HERE = Path(__file__).parent
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_MISSING = servers.missing_prerequisites()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            if _MISSING:
                item.add_marker(pytest.mark.skip(reason=_MISSING))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return bool(report is not None and report.failed)


@pytest.fixture(scope="session")
def e2e_root() -> Iterator[Path]:
    """Where the servers keep their state for this run.

    Not pytest's tmp_path: /tmp/pytest-of-root is 0700, and Dovecot's mail
    processes (uid `mail`) and Postfix's daemons (uid `postfix`) must traverse
    the path to their files. This directory is 0711: traversable, not listable.
    """
    root = Path(tempfile.mkdtemp(prefix="iqmaild-e2e-"))
    root.chmod(0o711)
    yield root
    if os.environ.get("IQMAILD_E2E_KEEP"):
        print(f"e2e server state kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot(e2e_root: Path) -> Iterator[Dovecot]:
    server = Dovecot(e2e_root / "dovecot")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def template_db(e2e_root: Path) -> Path:
    """A database made by `iqmaild migrate` and `iqmaild directory import`, to copy."""
    made = DeskDaemon(e2e_root / "template", relay_port=25)
    assert not (made.db_path.parent / "iqmaild.db-wal").exists()
    return made.db_path


@pytest.fixture
def mail(dovecot: Dovecot) -> Iterator[Mailboxes]:
    """Every mailbox, emptied first: ``mail["staff@desk.test"].wait_for(...)``."""
    subprocess.run(
        [servers.DOVEADM, "-c", str(dovecot.config), "expunge", "-A", "mailbox", "INBOX", "all"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    boxes = Mailboxes(dovecot.imap_port)
    try:
        yield boxes
    finally:
        boxes.close()


@dataclass
class Desk:
    """One desk: its Postfix, its daemon, the mailboxes."""

    postfix: Postfix
    daemon: DeskDaemon
    mail: Mailboxes
    sent: list[str] = field(default_factory=list)

    def send(
        self,
        msg: EmailMessage | bytes,
        mail_from: str | None = None,
        rcpts: list[str] | None = None,
        smtputf8: bool = False,
    ) -> str:
        """A customer's server hands the message to our MX; Postfix's queue id."""
        if mail_from is None:
            assert isinstance(msg, EmailMessage), "raw bytes need mail_from"
            mail_from = str(msg["From"].addresses[0].addr_spec)
        queue_id = send_via_mx(
            self.postfix.mx_port, msg, mail_from, rcpts or ["bok@desk.test"], smtputf8
        )
        self.sent.append(queue_id)
        return queue_id

    @property
    def staff(self) -> Any:
        return self.mail["staff@desk.test"]

    def wait_ticket(
        self, number: int, check: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def ok() -> bool:
            nonlocal last
            last = self.daemon.ticket(number)
            return check(last)

        try:
            servers.wait_until(ok, timeout, f"ticket {number}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {last}") from None
        return last


@pytest.fixture
def make_desk(
    request: pytest.FixtureRequest,
    e2e_root: Path,
    dovecot: Dovecot,
    mail: Mailboxes,
    template_db: Path,
) -> Iterator[Callable[..., Desk]]:
    """Start Postfix and the daemon: ``make_desk(protocol="lmtp", **config_sections)``."""
    made: list[Desk] = []
    name = request.node.name.replace("/", "_")[:60]
    # Short: Postfix's unix sockets live below it (108 bytes per socket path).
    base = Path(tempfile.mkdtemp(prefix="t", dir=e2e_root))
    base.chmod(0o711)
    (base / "test").write_text(request.node.nodeid + "\n", encoding="utf-8")

    def make(
        protocol: str = "smtp",
        daemon_protocol: str | None = None,
        message_size_limit: int = 10_240_000,
        directory: dict[str, Any] | None = None,
        start_daemon: bool = True,
        extra_recipients: tuple[str, ...] = (),
        refused_at_rcpt: tuple[str, ...] = (),
        transports: dict[str, str] | None = None,
        delay_warning_time: str = "0h",
        postfix_main: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ) -> Desk:
        # The daemon's ports are chosen first: Postfix's transport map names them.
        daemon = DeskDaemon(
            base / "iqmaild",
            relay_port=0,
            protocol=daemon_protocol or protocol,
            directory=directory,
            template=template_db,
            **sections,
        )
        postfix = Postfix(
            base / "postfix",
            dovecot_lmtp_port=dovecot.lmtp_port,
            daemon_port=daemon.smtp_port,
            daemon_protocol=protocol,
            message_size_limit=message_size_limit,
            extra_recipients=list(extra_recipients),
            refused_at_rcpt=list(refused_at_rcpt),
            transports=dict(transports or {}),
            delay_warning_time=delay_warning_time,
            main_overrides=dict(postfix_main or {}),
        )
        daemon.set_relay(postfix.outbound_port)
        desk = Desk(postfix, daemon, mail)
        made.append(desk)
        postfix.start()
        if start_daemon:
            daemon.start()
        return desk

    try:
        yield make
    finally:
        failed = _failed(request)
        for desk in made:
            code = None
            try:
                code = desk.daemon.stop()
            finally:
                try:
                    desk.postfix.stop()
                finally:
                    desk.daemon.close()
            if failed:
                print(f"\n--- daemon log ({desk.daemon.log}), exit {code} ---")
                print(desk.daemon.log_tail(80))
                print(f"\n--- Postfix log ({desk.postfix.maillog}) ---")
                print("\n".join(desk.postfix.log_text().splitlines()[-80:]))
        if failed:
            print(f"\n--- Dovecot log ({dovecot.log}) ---")
            print("\n".join(dovecot.log_text().splitlines()[-40:]))
            kept = request.config.rootpath / ".e2e-failed" / name
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(base, kept, ignore=shutil.ignore_patterns("spool", "data"))
            print(f"\nlogs and databases copied to {kept}")
        if not os.environ.get("IQMAILD_E2E_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def desk(make_desk: Callable[..., Desk]) -> Desk:
    """The default desk: Postfix hands the desk's mail to the daemon over SMTP."""
    return make_desk()


# -- Chromium ------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (sync API)."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=servers.CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    page = browser.new_page()
    try:
        yield page
    finally:
        page.close()
