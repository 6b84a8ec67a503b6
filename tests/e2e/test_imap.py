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

from tests.e2e.imap_desk import (
    FOLDERS,
    Box,
    PlainDovecot,
    TlsDovecot,
    add_user,
    deliver,
    events,
    imap_daemon,
    kick,
    stored,
)
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


def mid(msg: Any) -> str:
    return str(msg["Message-ID"]).strip("<>")


def burst(count: int, prefix: str) -> list[Any]:
    senders = ["owner@acme.test", "stranger@unknown.test", "dev@partner.test"]
    return [new_mail(senders[i % 3], f"{prefix} {i}") for i in range(count)]


def assert_exactly_once(case: Case, sent: list[Any]) -> None:
    """Every message stored once and filed once; nothing left in the watched folder."""
    seen = wait_filed(case.box, len(sent), timeout=120)
    assert set(seen) == {mid(m) for m in sent}
    counts = stored(case.daemon.db_path)
    assert set(counts) == {mid(m) for m in sent}
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:5]
    for folder, flags in seen.values():
        assert len(keyword_tickets(flags)) == 1, (folder, flags)


def test_mail_appended_while_idling_is_taken_at_once(imap_desk: Callable) -> None:
    # Neither a renewal of IDLE nor polling within the test: only the server's
    # push during IDLE can wake the daemon.
    case = imap_desk(idle_renew_seconds=1500, poll_seconds=3600)
    wait_until(lambda: events(case.daemon, "imap.connected"), 30, "the IMAP session")
    first = new_mail("owner@acme.test", "Pierwsza")
    case.deliver([first])
    wait_filed(case.box, 1)
    second = new_mail("owner@acme.test", "Druga")
    case.deliver([second])
    seen = wait_filed(case.box, 2)
    assert {mid(first), mid(second)} == set(seen)
    assert len(events(case.daemon, "imap.connected")) == 1  # one session throughout
    assert not events(case.daemon, "imap.idle_renewed")


def test_idle_is_renewed_and_keeps_watching(imap_desk: Callable) -> None:
    # Renewed every second here (the default, 25 minutes, stays below the
    # 29-minute limit of RFC 2177): DONE, IDLE again, on the same session.
    case = imap_desk(idle_renew_seconds=1.0, poll_seconds=3600)
    wait_until(lambda: len(events(case.daemon, "imap.idle_renewed")) >= 3, 30, "IDLE renewed")
    msg = new_mail("owner@acme.test", "Po odnowieniu")
    case.deliver([msg])
    assert set(wait_filed(case.box, 1)) == {mid(msg)}
    assert len(events(case.daemon, "imap.connected")) == 1


def test_kill_9_mid_batch_neither_skips_nor_duplicates(imap_desk: Callable) -> None:
    case = imap_desk(start=False, batch_size=5)
    sent = burst(300, "Burst")
    case.deliver(sent)
    case.daemon.start()
    wait_until(lambda: len(events(case.daemon, "imap.accepted")) >= 30, 60, "part of the backlog")
    case.daemon.kill9()
    taken = len(events(case.daemon, "imap.accepted"))
    assert taken < len(sent), "killed too late to be mid-backlog"
    case.daemon.start()
    assert_exactly_once(case, sent)


def test_a_cut_connection_reconnects_and_takes_everything_once(imap_desk: Callable) -> None:
    case = imap_desk(start=False, batch_size=5)
    sent = burst(300, "Cut")
    case.deliver(sent)
    case.daemon.start()
    for cuts in (1, 2):
        wait_until(
            lambda c=cuts: len(events(case.daemon, "imap.accepted")) >= 30 * c,
            60,
            "part of the backlog",
        )
        kick(case.dovecot, case.user)
        wait_until(lambda c=cuts: len(events(case.daemon, "imap.connected")) > c, 60, "a reconnect")
    assert_exactly_once(case, sent)
    assert events(case.daemon, "imap.disconnected")


def test_staff_copies_are_appended_to_the_staff_folder(imap_desk: Callable) -> None:
    case = imap_desk(staff_folder="Staff")
    msg = new_mail("owner@acme.test", "Kopia dla obsługi")
    case.deliver([msg])
    wait_filed(case.box, 1)

    def staff() -> list[Any]:
        return case.box.contents("Staff")

    copies = wait_until(staff, 30, "a staff copy in the Staff folder", interval=0.2)
    assert len(copies) == 1
    case.box.imap.select('"Staff"', readonly=True)
    _, data = case.box.imap.uid("FETCH", "1:*", "(BODY.PEEK[HEADER])")
    header = next(p[1] for p in data if isinstance(p, tuple)).decode()
    assert "X-IQ-Authorization: pending" in header
    assert f"<{mid(msg)}>" in header or mid(msg) in header
    case.box.imap.close()


def test_without_idle_or_move_it_polls_and_files_by_copy(
    e2e_root: Path, template_db: Path, imap_desk: Callable
) -> None:
    server = PlainDovecot(e2e_root / "dovecot-plain")
    server.start()
    try:
        user = "plain@desk.test"
        add_user(server, user)
        daemon = imap_daemon(e2e_root / "imap-plain", server, user, template_db, poll_seconds=0.5)
        box = Box(server, user)
        case = Case(daemon, box, user, server)
        try:
            daemon.start()
            sent = burst(12, "Poll")
            case.deliver(sent)
            assert_exactly_once(case, sent)
            (connected,) = events(daemon, "imap.connected")
            assert connected["idle"] is False and connected["move"] is False
        finally:
            box.close()
            daemon.close()
    finally:
        server.stop()


def test_a_backlog_is_taken_in_bounded_batches(imap_desk: Callable) -> None:
    case = imap_desk(start=False, batch_size=50)
    sent = burst(1000, "Backlog")
    case.deliver(sent)
    case.daemon.start()
    assert_exactly_once(case, sent)
    batches = events(case.daemon, "imap.batch")
    assert len(batches) >= len(sent) // 50
    assert max(b["messages"] for b in batches) <= 50


@pytest.fixture(scope="module")
def tls_dovecot(e2e_root: Path) -> Iterator[TlsDovecot]:
    server = TlsDovecot(e2e_root / "dovecot-tls")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_starttls_and_tls_verify_the_server(
    security: str, tls_dovecot: TlsDovecot, e2e_root: Path, template_db: Path
) -> None:
    user = f"tls-{security}@desk.test"
    add_user(tls_dovecot, user)
    port = tls_dovecot.imaps_port if security == "tls" else tls_dovecot.imap_port
    wrong = imap_daemon(
        e2e_root / f"imap-tls-wrong-{security}",
        tls_dovecot,
        user,
        template_db,
        security=security,
        port=port,  # the system's CAs: our self-signed certificate is refused
    )
    box = Box(tls_dovecot, user)
    daemon: DeskDaemon | None = None
    try:
        wrong.start()
        failure = wait_until(
            lambda: events(wrong, "imap.disconnected"), 30, "the refused certificate"
        )[0]
        assert "CERTIFICATE_VERIFY_FAILED" in failure["error"], failure
        wrong.close()
        # Made only now: its ports are free now (other processes bind too).
        daemon = imap_daemon(
            e2e_root / f"imap-tls-{security}",
            tls_dovecot,
            user,
            template_db,
            security=security,
            port=port,
            ca_file=str(tls_dovecot.cert),
        )
        case = Case(daemon, box, user, tls_dovecot)
        daemon.start()
        sent = [new_mail("owner@acme.test", f"Przez {security}")]
        case.deliver(sent)
        assert_exactly_once(case, sent)
        logins = [
            line
            for line in tls_dovecot.log_text().splitlines()
            if f"Login: user=<{user}>" in line and ", TLS," in line
        ]
        assert logins, "the daemon's session was not TLS"
    finally:
        box.close()
        wrong.close()
        if daemon is not None:
            daemon.close()


def test_a_new_uidvalidity_takes_the_folder_again_without_storing_twice(
    imap_desk: Callable,
) -> None:
    case = imap_desk(start=False, folder="Desk")
    box = case.box

    def raw(msg: Any) -> bytes:
        return b"Return-Path: <owner@acme.test>\r\n" + msg.as_bytes().replace(b"\n", b"\r\n")

    old, kept, new = (new_mail("owner@acme.test", f"Sprawa {n}") for n in (1, 2, 3))
    assert box.imap.create('"Desk"')[0] == "OK"
    box.append("Desk", raw(old))
    box.append("Desk", raw(kept))
    case.daemon.start()
    wait_until(lambda: len(filed(box)) == 2 and not box.count("Desk"), 60, "the first two filed")
    assert case.daemon.stop() == 0
    # The folder is made again (a restore, a migration): its UIDs start over.
    assert box.imap.delete('"Desk"')[0] == "OK"
    assert box.imap.create('"Desk"')[0] == "OK"
    box.append("Desk", raw(old))  # the same message again, now UID 1 again
    box.append("Desk", raw(new))
    case.daemon.start()
    wait_until(lambda: box.count("Desk") == 0, 60, "the folder taken again")
    (changed,) = events(case.daemon, "imap.uidvalidity_changed")
    assert changed["old"] != changed["new"]
    counts = stored(case.daemon.db_path)
    assert counts == {mid(old): 1, mid(kept): 1, mid(new): 1}
    pending = [m for m, _ in box.contents("Pending")]
    assert sorted(pending) == sorted([mid(old), mid(kept), mid(old), mid(new)])
    duplicates = [e for e in events(case.daemon, "imap.accepted") if e["duplicate"]]
    assert len(duplicates) == 1
