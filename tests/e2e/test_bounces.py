"""Our own mail failing, in every shape Postfix produces (issue 7 §1.2).

A link mail to a customer can fail four ways behind a real Postfix:

- ``rcpt``: the relay refuses the recipient at RCPT (550 5.1.1) while the
  daemon is still talking to it: no bounce ever exists, the outbox row fails;
- ``error``: an ``error:`` transport entry for the address. Postfix does not
  accept and bounce it: its smtpd looks the transport up at RCPT and refuses
  there ("Recipient address rejected: <the entry's text>"), so this is the
  ``rcpt`` shape with the operator's own words;
- ``mailbox``: accepted, then the final hop (Dovecot's LMTP) has no such user:
  an asynchronous 5.1.1 bounce;
- ``delayed``: the customer's server is down (nothing listens where the
  transport points) and Postfix, holding the mail, sends a delay warning after
  ``delay_warning_time``.

A ``retry:`` transport entry makes no delay warning: like ``error:``, smtpd
applies it at RCPT (450 4.2.1), so the daemon's outbox keeps the mail and
retries itself; Postfix never holds it.

Each is filed under the outbox row it concerns. The three permanent failures
spend the link and suppress automatic mail to that address, the same way; a
delay warning does neither.
"""

from __future__ import annotations

import contextlib
import copy
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Desk
from tests.e2e.mail import Received, new_mail
from tests.e2e.servers import free_ports, wait_until
from tests.harness import DIRECTORY

REFUSED = "refused@acme.test"  # the relay answers 550 5.1.1 at RCPT
GONE = "gone@acme.test"  # transport error:5.1.1
NO_MAILBOX = "nobox@acme.test"  # Dovecot has no such user
SLOW = "slow@acme.test"  # its server is down: delay warnings after 1 s
BUSY = "busy@acme.test"  # transport retry:4.2.1

SHAPES = {"rcpt": REFUSED, "error": GONE, "mailbox": NO_MAILBOX}


def _directory() -> dict[str, Any]:
    directory = copy.deepcopy(DIRECTORY)
    for address in (REFUSED, GONE, NO_MAILBOX, SLOW, BUSY):
        local = address.split("@")[0]
        directory["accounts"].append({"id": local, "primary": address, "name": local.title()})
    return directory


@pytest.fixture
def failing_desk(make_desk: Callable[..., Desk]) -> Desk:
    return make_desk(
        directory=_directory(),
        refused_at_rcpt=(REFUSED,),
        transports={
            GONE: "error:5.1.1 mailbox gone",
            BUSY: "retry:4.2.1 mailbox busy",
            SLOW: f"smtp:[127.0.0.1]:{free_ports(1)[0]}",  # nothing listens there
        },
        delay_warning_time="1s",
    )


def db_rows(db: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        return con.execute(query, args).fetchall()


def link_rows(desk: Desk, address: str) -> list[dict[str, Any]]:
    return [
        r for r in desk.daemon.outbox() if r["kind"] == "auth_request" and r["recipient"] == address
    ]


def returned_for(row_id: int) -> Callable[[Received], bool]:
    """The staff copy of a report filed under outbox row ``row_id``."""
    return lambda r: r.header("X-IQ-Returned").startswith(f"outbox {row_id} ")


def new_request(desk: Desk, sender: str, subject: str) -> tuple[int, Received]:
    msg = new_mail(sender, subject)
    desk.send(msg)
    staff = desk.staff.wait_for(
        lambda r: r.header("In-Reply-To") == msg["Message-ID"] and bool(r.header("X-IQ-Ticket"))
    )[0]
    assert staff.header("X-IQ-Authorization") == "pending", staff.raw[:1500]
    return int(staff.header("X-IQ-Ticket")), staff


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_a_permanent_failure_of_a_link_mail_is_filed_spends_the_link_and_suppresses(
    failing_desk: Desk, shape: str
) -> None:
    desk, address = failing_desk, SHAPES[shape]
    number, _ = new_request(desk, address, f"Nie dojdzie ({shape})")

    def failed() -> dict[str, Any] | None:
        rows = link_rows(desk, address)
        done = [r for r in rows if r["state"] == "failed" or "returned:" in r["last_error"]]
        return done[0] if done else None

    row = wait_until(failed, 30, f"the link mail's failure ({shape})", interval=0.3)
    if shape in ("rcpt", "error"):
        # Refused while the daemon was still in the SMTP transaction: no bounce exists,
        # the row itself says so.
        assert row["state"] == "failed" and "RCPT 550 5.1.1" in row["last_error"], row
        if shape == "error":
            assert "mailbox gone" in row["last_error"], row
        rejected = f"NOQUEUE: reject: RCPT from localhost[127.0.0.1]: 550 5.1.1 <{address}>"
        assert rejected in desk.postfix.log_text()
    else:
        # Accepted, then bounced: the report came back to the row's signed envelope
        # sender and is filed under that row and its ticket, never answered.
        assert row["state"] == "sent" and row["last_error"].startswith("returned: 5.1.1"), row
        report = desk.staff.wait_for(returned_for(row["id"]), timeout=30)[0]
        assert report.header("X-IQ-Authorization") == "ignored"
        assert report.header("X-IQ-Ticket") == str(number)
        assert "bounce" in report.header("X-IQ-Reasons")
        # RET=HDRS: Postfix returned the headers of the link mail, not the link.
        parts = [part.get_content_type() for part in report.msg.walk()]
        assert "text/rfc822-headers" in parts and "message/rfc822" not in parts, parts
        assert "/authorize/" not in report.all_text()
        bounced = [d for d in desk.postfix.deliveries() if d["to"] == address]
        assert bounced and bounced[-1]["status"] == "bounced", bounced
    # The link can never be used (it never arrived, or came back).
    [(used,)] = db_rows(
        desk.daemon.db_path,
        "SELECT used_at FROM auth_tokens WHERE outbox_id = ?",
        row["id"],
    )
    assert used is not None
    # The address is suppressed: a new request from it gets no link mail, and staff
    # see why in the copy.
    [(reason,)] = db_rows(
        desk.daemon.db_path, "SELECT reason FROM suppressions WHERE email = ?", address
    )
    assert "5.1.1" in reason, reason
    _, again = new_request(desk, address, f"Jeszcze raz ({shape})")
    assert "auth_request:bounced" in again.header("X-IQ-Suppressed"), again.raw[:1500]
    assert len(link_rows(desk, address)) == 1
    decisions = {m["decision"] for m in desk.daemon.messages()}
    assert decisions <= {"pending", "ignored"}, decisions


def test_a_delay_warning_is_filed_and_spends_nothing(failing_desk: Desk) -> None:
    desk = failing_desk
    number, _ = new_request(desk, SLOW, "Skrzynka zajęta")
    [row] = link_rows(desk, SLOW)
    # Postfix keeps the link mail queued (connection refused) and warns after
    # delay_warning_time.
    report = desk.staff.wait_for(returned_for(row["id"]), timeout=30)[0]
    assert report.header("X-IQ-Authorization") == "ignored"
    assert report.header("X-IQ-Ticket") == str(number)
    assert "delayed" in report.all_text().lower() or "delay" in report.subject.lower()
    [row] = link_rows(desk, SLOW)
    assert row["state"] == "sent" and row["last_error"].startswith("returned: delayed"), row
    assert any(q for q in desk.postfix.queue()), "the link mail is still in Postfix's queue"
    # Only a warning: the link still works, the address is not suppressed.
    [(used,)] = db_rows(
        desk.daemon.db_path, "SELECT used_at FROM auth_tokens WHERE outbox_id = ?", row["id"]
    )
    assert used is None
    assert db_rows(desk.daemon.db_path, "SELECT email FROM suppressions") == []
    _, again = new_request(desk, SLOW, "Skrzynka nadal zajęta")
    assert "bounced" not in again.header("X-IQ-Suppressed")
    wait_until(lambda: len(link_rows(desk, SLOW)) == 2, 10, "a second link mail")


def test_a_retry_transport_defers_at_rcpt_and_the_outbox_keeps_the_mail(
    failing_desk: Desk,
) -> None:
    desk = failing_desk
    new_request(desk, BUSY, "Chwilowo zajęta")

    def retried() -> dict[str, Any] | None:
        rows = link_rows(desk, BUSY)
        return rows[0] if rows and rows[0]["attempts"] >= 2 else None

    row = wait_until(retried, 30, "the outbox to retry the link mail", interval=0.3)
    assert row["state"] in ("queued", "sending"), row
    assert "RCPT 450 4.2.1" in row["last_error"] and "mailbox busy" in row["last_error"], row
    assert not desk.postfix.queue()  # Postfix never took it: the daemon holds it
    assert db_rows(desk.daemon.db_path, "SELECT email FROM suppressions") == []
