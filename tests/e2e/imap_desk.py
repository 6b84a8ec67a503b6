"""IMAP mode's desk for the e2e tests: a Dovecot mailbox the daemon watches.

Reuses the session's Dovecot (``tests/e2e/servers.py``): each test gets a user
of its own (added to Dovecot's passwd-file, which Dovecot re-reads), mail is
delivered into it over Dovecot's LMTP (so it carries the Return-Path and
Delivered-To a real delivery writes), and the daemon is ``iqmaild serve``
with ``[imap]`` pointing at it. The tests look with imaplib and the CLI.
"""

from __future__ import annotations

import contextlib
import imaplib
import json
import re
import smtplib
import sqlite3
import subprocess
from collections import Counter
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from tests.e2e.servers import DOVEADM, PASSWORD, DeskDaemon, Dovecot, free_ports

FOLDERS = {
    "authorized": "Authorized",
    "pending": "Pending",
    "unauthorized": "Unauthorized",
    "ignored": "Ignored",
}


def add_user(dovecot: Dovecot, user: str) -> None:
    users = dovecot.root / "users"
    line = f"{user.lower()}:{{PLAIN}}{PASSWORD}::::::\n"
    if line not in users.read_text(encoding="utf-8"):
        with users.open("a", encoding="utf-8") as f:
            f.write(line)


def deliver(dovecot: Dovecot, user: str, messages: list[EmailMessage | bytes]) -> None:
    """Into the user's INBOX over Dovecot's LMTP, as Postfix's lmtp: transport does."""
    with smtplib.LMTP("127.0.0.1", dovecot.lmtp_port, timeout=60) as lmtp:
        for msg in messages:
            raw = msg if isinstance(msg, bytes) else msg.as_bytes()
            sender = "sender@customer.test"
            if isinstance(msg, EmailMessage):
                sender = str(msg["From"].addresses[0].addr_spec)
            refused = lmtp.sendmail(sender, [user], raw)
            assert not refused, refused


class Box:
    """The watched account as the tests see it (imaplib)."""

    def __init__(self, dovecot: Dovecot, user: str) -> None:
        self.port = dovecot.imap_port
        self.user = user
        self.imap = self._login()

    def _login(self) -> imaplib.IMAP4:
        imap = imaplib.IMAP4("127.0.0.1", self.port, timeout=30)
        imap.login(self.user, PASSWORD)
        return imap

    def again(self) -> None:
        """After ``doveadm kick`` (it cuts the tests' connection too)."""
        with contextlib.suppress(Exception):
            self.imap.shutdown()
        self.imap = self._login()

    def folders(self) -> set[str]:
        typ, data = self.imap.list()
        assert typ == "OK", data
        out = set()
        for line in data:
            m = re.search(rb'"([^"]*)"$|(\S+)$', line or b"")
            if m:
                out.add((m.group(1) or m.group(2)).decode())
        return out

    def contents(self, folder: str) -> list[tuple[str, set[str]]]:
        """(Message-ID, flags) of every message in ``folder``; [] when it does not exist."""
        try:
            return self._contents(folder)
        except (imaplib.IMAP4.abort, OSError):
            self.again()
            return self._contents(folder)

    def _contents(self, folder: str) -> list[tuple[str, set[str]]]:
        typ, _ = self.imap.select(f'"{folder}"', readonly=True)
        if typ != "OK":
            return []
        typ, data = self.imap.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", data
        out = []
        flags: set[str] = set()
        for part in data:
            if isinstance(part, tuple):
                m = re.search(rb"FLAGS \(([^)]*)\)", part[0])
                flags = set(m.group(1).decode().split()) if m else set()
                mid = part[1].decode().partition(":")[2].strip().strip("<>")
                out.append((mid, flags))
        self.imap.close()
        return out

    def count(self, folder: str) -> int:
        try:
            typ, data = self.imap.status(f'"{folder}"', "(MESSAGES)")
        except (imaplib.IMAP4.abort, OSError):
            self.again()
            typ, data = self.imap.status(f'"{folder}"', "(MESSAGES)")
        if typ != "OK":
            return 0
        return int(re.search(rb"MESSAGES (\d+)", data[0]).group(1))  # type: ignore[union-attr]

    def append(self, folder: str, raw: bytes) -> None:
        typ, data = self.imap.append(f'"{folder}"', None, None, raw)
        assert typ == "OK", data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.imap.logout()


def imap_daemon(
    root: Path,
    dovecot: Dovecot,
    user: str,
    template: Path,
    sections: dict[str, dict[str, Any]] | None = None,
    **imap: Any,
) -> DeskDaemon:
    """``iqmaild serve`` watching ``user``'s INBOX; its relay is a closed port."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": dovecot.imap_port,
        "security": "plain",
        "user": user,
        "password": PASSWORD,
        "batch_size": 20,
        "reconnect_max_seconds": 2.0,
    }
    settings.update(imap)
    (closed,) = free_ports(1)
    return DeskDaemon(
        root,
        relay_port=closed,
        template=template,
        imap=settings,
        processing={"poll_seconds": 0.2},
        **(sections or {}),
    )


def stored(db: Path) -> Counter[str]:
    """Message-IDs of the stored messages (each must be 1)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        rows = con.execute("SELECT message_id FROM messages WHERE channel = 'imap'").fetchall()
    return Counter(str(mid).strip("<>") for (mid,) in rows)


class PlainDovecot(Dovecot):
    """A second Dovecot whose logged-in sessions offer neither IDLE nor MOVE: the
    daemon must poll, and file by COPY, STORE \\Deleted and UID EXPUNGE."""

    CAPABILITY = "IMAP4rev1 LITERAL+ SASL-IR LOGIN-REFERRALS ID ENABLE UIDPLUS NAMESPACE"

    def write_config(self) -> None:
        super().write_config()
        text = self.config.read_text(encoding="utf-8")
        text = text.replace("instance_name = iqmaild-e2e-", "instance_name = iqmaild-e2e-plain-")
        self.config.write_text(text + f"\nimap_capability = {self.CAPABILITY}\n", encoding="utf-8")


def kick(dovecot: Dovecot, user: str) -> None:
    """Cut the user's IMAP connections from the server's side (doveadm kick)."""
    subprocess.run(
        [DOVEADM, "-c", str(dovecot.config), "kick", user],
        capture_output=True,
        timeout=30,
        check=True,
    )


class TlsDovecot(Dovecot):
    """A Dovecot with a self-signed certificate for 127.0.0.1: STARTTLS on its
    IMAP port, implicit TLS on ``imaps_port``; ``cert`` is the CA to trust."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        (self.imaps_port,) = free_ports(1)
        self.cert = root / "cert.pem"
        self.key = root / "key.pem"

    def write_config(self) -> None:
        super().write_config()
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(self.key), "-out", str(self.cert),
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )  # fmt: skip
        text = self.config.read_text(encoding="utf-8")
        text = text.replace("instance_name = iqmaild-e2e-", "instance_name = iqmaild-e2e-tls-")
        text = text.replace("ssl = no", "ssl = yes")
        text = text.replace(
            "inet_listener imaps {\n    port = 0",
            f"inet_listener imaps {{\n    address = 127.0.0.1\n    port = {self.imaps_port}",
        )
        text += (
            f"\nssl_cert = <{self.cert}\nssl_key = <{self.key}\n"
            "ssl_dh = </usr/share/dovecot/dh.pem\n"
        )
        self.config.write_text(text, encoding="utf-8")


def all_events(daemon: DeskDaemon) -> list[dict[str, Any]]:
    """The daemon's log events, also where the worker's line landed on the same line.

    Under PYTHONUNBUFFERED (the e2e daemons run so) ``print`` writes the text
    and its newline in two writes: two processes sharing the log interleave
    as ``{...}{...}``, which ``DeskDaemon.events`` skips.
    """
    out = []
    if not daemon.log.exists():
        return out
    for line in daemon.log.read_text(errors="replace").splitlines():
        for part in re.split(r"(?<=\})(?=\{)", line.strip()):
            with contextlib.suppress(ValueError):
                item = json.loads(part)
                if isinstance(item, dict):
                    out.append(item)
    return out


def events(daemon: DeskDaemon, name: str) -> list[dict[str, Any]]:
    return [e for e in all_events(daemon) if e.get("event") == name]
