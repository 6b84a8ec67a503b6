"""Faults with a real MTA in front: nothing acknowledged is lost or stored twice.

- the daemon is stopped: the mail waits in Postfix's queue and arrives once;
- kill -9 in the middle of a burst: every message Postfix delivered is stored once;
- the database is locked: 451, Postfix defers, the mail arrives later;
- the relay is down for the daemon's outbound mail: the outbox drains later.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.e2e.conftest import Desk
from tests.e2e.flows import OWNER, from_desk
from tests.e2e.mail import copied, copy_of, new_mail, send_via_mx, verdict
from tests.e2e.servers import wait_until


def stored_message_ids(db: Path) -> Counter[str]:
    """Message-IDs of the received messages, read from the daemon's database."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as con:
        rows = con.execute("SELECT message_id FROM messages").fetchall()
    return Counter(str(mid).strip("<>") for (mid,) in rows)


def to_daemon(desk: Desk, status: str | None = None) -> list[dict[str, str]]:
    return [
        d
        for d in desk.postfix.deliveries(desk.daemon.smtp_port)
        if status is None or d["status"] == status
    ]


def test_mail_waits_in_postfix_while_the_daemon_is_stopped(desk: Desk) -> None:
    assert desk.daemon.stop() == 0  # SIGTERM, as systemd stops it
    msg = new_mail(OWNER, "Wysłane w czasie przerwy")
    queue_id = desk.send(msg)

    def deferred() -> bool:
        return any(
            q["queue_id"] == queue_id
            and q["queue_name"] == "deferred"
            and "refused" in q["recipients"][0].get("delay_reason", "")
            for q in desk.postfix.queue()
        )

    wait_until(deferred, 15, "Postfix to defer the mail while the daemon is down")
    assert not desk.staff.poll()

    desk.daemon.start()
    staff = desk.staff.wait_for(verdict("pending"), timeout=30)[0]
    assert copy_of(msg)(staff)
    desk.mail[OWNER].wait_for(from_desk)
    wait_until(lambda: not desk.postfix.queue(), 15, "Postfix's queue to empty")
    time.sleep(1.0)  # a second delivery would have shown up by now
    assert len(desk.staff.poll()) == 1
    assert len(desk.mail[OWNER].poll()) == 1
    assert [d["queue_id"] for d in to_daemon(desk, "sent")] == [queue_id]
    assert stored_message_ids(desk.daemon.db_path) == Counter({msg["Message-ID"].strip("<>"): 1})


BURST = 60


def test_kill_9_mid_burst_stores_every_delivered_message_exactly_once(desk: Desk) -> None:
    ids = [f"burst-{n}@unknown.test" for n in range(BURST)]
    for n, mid in enumerate(ids):
        send_via_mx(
            desk.postfix.mx_port,
            new_mail("stranger@unknown.test", f"Seria {n}", message_id=f"<{mid}>"),
            "stranger@unknown.test",
            ["bok@desk.test"],
        )
    # Kill once Postfix has handed over part of the burst.
    wait_until(lambda: len(to_daemon(desk, "sent")) >= 10, 30, "10 deliveries", interval=0.01)
    desk.daemon.kill9()
    at_kill = {d["message_id"] for d in to_daemon(desk, "sent")}
    assert len(at_kill) < BURST, "the burst was over before the kill; nothing was tested"

    time.sleep(1.0)  # Postfix meets a dead daemon: deferrals
    desk.daemon.start()
    wait_until(lambda: not desk.postfix.queue(), 60, "Postfix to deliver the rest", interval=0.2)

    delivered = Counter(d["message_id"] for d in to_daemon(desk, "sent"))
    assert set(delivered) == set(ids)  # Postfix delivered everything in the end
    stored = stored_message_ids(desk.daemon.db_path)
    assert set(stored) == set(ids), set(ids) ^ set(stored)
    twice = {mid: n for mid, n in stored.items() if n != 1}
    assert not twice, f"stored more than once: {twice}"
    redelivered = {mid for mid, n in delivered.items() if n > 1}
    print(
        f"\ndelivered before the kill: {len(at_kill)}, delivered twice by Postfix: "
        f"{len(redelivered)}, deferred: {len(to_daemon(desk, 'deferred'))}"
    )

    # Every one of them reaches staff.
    copies = desk.staff.wait_for(verdict("unauthorized"), count=BURST, timeout=60)
    got = Counter(copied(r).strip("<>") for r in copies)
    assert set(got) == set(ids)


@contextlib.contextmanager
def database_locked(db: Path) -> Iterator[None]:
    """Another process holds SQLite's write lock (a backup, an operator's sqlite3)."""
    con = sqlite3.connect(db, timeout=30, isolation_level=None)
    try:
        con.execute("BEGIN EXCLUSIVE")
        yield
        con.execute("ROLLBACK")
    finally:
        con.close()


def test_a_locked_database_answers_451_and_postfix_delivers_later(desk: Desk) -> None:
    msg = new_mail(OWNER, "Baza zablokowana")
    with database_locked(desk.daemon.db_path):
        queue_id = desk.send(msg)
        wait_until(
            lambda: any(d["queue_id"] == queue_id for d in to_daemon(desk, "deferred")),
            60,
            "Postfix to defer the mail on a temporary error",
        )
        deferral = next(d for d in to_daemon(desk, "deferred") if d["queue_id"] == queue_id)
        assert " 451 " in f" {deferral['text']} " or "4.3.0" in deferral["text"], deferral
    staff = desk.staff.wait_for(verdict("pending"), timeout=30)[0]
    assert copy_of(msg)(staff)
    wait_until(lambda: not desk.postfix.queue(), 15, "Postfix's queue to empty")
    assert not to_daemon(desk, "bounced")
    assert stored_message_ids(desk.daemon.db_path)[msg["Message-ID"].strip("<>")] == 1


def test_relay_down_the_outbox_drains_later(make_desk: Callable[..., Desk]) -> None:
    desk = make_desk()
    desk.postfix.set_outbound(False)  # the daemon's relay port goes away, the MX stays
    msg = new_mail(OWNER, "Przekaźnik nie działa")
    desk.send(msg)

    def retrying() -> bool:
        rows = desk.daemon.outbox()
        return bool(rows) and all(
            r["state"] == "queued" and r["attempts"] >= 2 and r["last_error"] for r in rows
        )

    wait_until(retrying, 30, "the outbox to retry against the dead relay", interval=0.3)
    assert not desk.staff.poll() and not desk.mail[OWNER].poll()
    ticket = desk.daemon.ticket(1000)
    assert ticket["authorization"] == "pending"  # classified: only delivery waits

    desk.postfix.set_outbound(True)
    staff = desk.staff.wait_for(verdict("pending"), timeout=30)[0]
    assert copy_of(msg)(staff)
    desk.mail[OWNER].wait_for(from_desk, timeout=30)
    wait_until(
        lambda: all(r["state"] == "sent" for r in desk.daemon.outbox()),
        30,
        "the outbox to drain",
        interval=0.3,
    )
    time.sleep(1.0)
    assert len(desk.staff.poll()) == 1 and len(desk.mail[OWNER].poll()) == 1  # nothing twice
