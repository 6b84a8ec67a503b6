"""IMAP mode against a real Dovecot: intake from a watched folder, filing by decision.

The daemon watches a Dovecot user's INBOX (IDLE), stores new mail through the
same pipeline as SMTP, and files each processed message into the folder of
its decision with a keyword naming its ticket. Exactly once across a kill -9
and a cut connection: every message is stored once and filed once.
"""

from __future__ import annotations

import itertools
import json
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.imap_desk import FOLDERS, Box, add_user, deliver, imap_daemon, stored
from tests.e2e.mail import new_mail
from tests.e2e.servers import DeskDaemon, Dovecot, wait_until
from tests.harness import PANEL_TOKEN

_users = itertools.count(1)


@dataclass
class Case:
    daemon: DeskDaemon
    box: Box
    user: str
    dovecot: Dovecot

    def deliver(self, messages: list[Any]) -> None:
        deliver(self.dovecot, self.user, messages)


@pytest.fixture
def imap_desk(
    e2e_root: Path, dovecot: Dovecot, template_db: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Case]]:
    """``make(**imap)``: a fresh Dovecot user, and a daemon watching its INBOX."""
    made: list[Case] = []

    def make(start: bool = True, sections: dict[str, Any] | None = None, **imap: Any) -> Case:
        user = f"desk{os.getpid()}-{next(_users)}@desk.test"
        add_user(dovecot, user)
        root = e2e_root / f"imap-{user.split('@')[0]}"
        daemon = imap_daemon(root, dovecot, user, template_db, sections, **imap)
        case = Case(daemon, Box(dovecot, user), user, dovecot)
        made.append(case)
        if start:
            daemon.start()
        return case

    yield make
    failed = getattr(request.node, "report_call", None)
    for case in made:
        case.box.close()
        case.daemon.close()
        if failed is not None and failed.failed:
            print(f"\n--- daemon log ({case.daemon.log}) ---\n{case.daemon.log_tail(80)}")
            print("\n".join(dovecot.log_text().splitlines()[-30:]))


def filed(box: Box) -> dict[str, tuple[str, set[str]]]:
    """Message-ID -> (folder, flags) over the decision folders."""
    out: dict[str, tuple[str, set[str]]] = {}
    for folder in FOLDERS.values():
        for mid, flags in box.contents(folder):
            assert mid not in out, f"{mid} filed twice ({out[mid][0]} and {folder})"
            out[mid] = (folder, flags)
    return out


def wait_filed(box: Box, count: int, timeout: float = 30) -> dict[str, tuple[str, set[str]]]:
    def done() -> dict[str, tuple[str, set[str]]] | None:
        seen = filed(box)
        return seen if len(seen) >= count and not box.count("INBOX") else None

    try:
        return wait_until(done, timeout, f"{count} messages filed", interval=0.2)
    except AssertionError:
        raise AssertionError(
            f"{len(filed(box))} of {count} filed, {box.count('INBOX')} left in INBOX"
        ) from None


def panel_ticket(daemon: DeskDaemon) -> tuple[int, str]:
    request = urllib.request.Request(
        daemon.base_url + "/api/v1/tickets",
        data=json.dumps({"account_id": "acme", "subject": "Panel", "body": "x"}).encode(),
        headers={"Authorization": f"Bearer {PANEL_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        data = json.loads(resp.read())
    return int(data["number"]), str(data["tag"])


def keyword_tickets(flags: set[str]) -> list[int]:
    return [int(f[3:]) for f in flags if f.startswith("IQ-") and f[3:].isdigit()]


def test_new_mail_is_filed_by_decision_with_its_ticket_keyword(imap_desk: Callable) -> None:
    case = imap_desk(sections={"http": {"panel_token": PANEL_TOKEN}})
    daemon, box = case.daemon, case.box
    number, tag = panel_ticket(daemon)
    mails = {
        "pending": new_mail("owner@acme.test", "Nie działa poczta"),
        "unauthorized": new_mail("stranger@unknown.test", "Hello"),
        "ignored": new_mail(
            "owner@acme.test", "Out of office", headers={"Auto-Submitted": "auto-replied"}
        ),
        "authorized": new_mail("owner@acme.test", f"Re: {tag} Panel"),
    }
    case.deliver(list(mails.values()))
    seen = wait_filed(box, len(mails))
    assert box.folders() >= set(FOLDERS.values())  # created when missing
    for decision, msg in mails.items():
        folder, flags = seen[str(msg["Message-ID"]).strip("<>")]
        assert folder == FOLDERS[decision], (decision, folder)
        if decision != "ignored":
            assert keyword_tickets(flags), (decision, flags)
        if decision == "authorized":
            assert keyword_tickets(flags) == [number]
        assert "\\Seen" not in flags  # staff have not read it: we only peeked
    assert all(n == 1 for n in stored(daemon.db_path).values())
    rows = [m for m in daemon.messages() if m["channel"] == "imap"]
    assert sorted(m["decision"] for m in rows) == sorted(mails)
