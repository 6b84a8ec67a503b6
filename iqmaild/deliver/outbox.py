"""The outbox sender: the only place that talks SMTP to the relay.

Rows are claimed in batches (``queued`` -> ``sending``, a lease; ``SKIP
LOCKED`` on PostgreSQL) and sent over a few reused connections, each mail with
our signed envelope sender (VERP: a report names its row). A row the relay
accepted is marked ``sent`` at once, at intake priority, together with
whatever else was accepted meanwhile; while that mark cannot commit, nothing
more is sent (each such row is a duplicate if we die). Retries back off;
customer mail gives up after the queue lifetime (Postfix's 5 days by default;
a link after its own validity), staff copies never (an operator acts; health
and the log say so). A 5xx for a recipient is final for customer mail and
suppresses automatic mail to that address; a 5xx for the relay's own reasons
(greeting, MAIL) is the relay's fault and retried.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiosmtplib
from sqlalchemy import bindparam, func, or_, select, update

from iqmaild.clock import Clock
from iqmaild.config import Config, split_host_port
from iqmaild.core import verp
from iqmaild.core.vocabulary import AUTOMATIC_MAIL, MailKind
from iqmaild.metrics import Metrics
from iqmaild.storage.db import Database
from iqmaild.storage.models import AuthToken, OutboxItem, Suppression

CLAIM_BATCH = 50
LEASE_SECONDS = 1800  # longer than the worst case of a batch on a stuck relay
INLINE_CONTENT = 256 * 1024  # smaller mail is read with its batch, larger one by one
CUSTOMER_KINDS = frozenset(k.value for k in AUTOMATIC_MAIL | {MailKind.STAFF_REPLY})


class TransientDelivery(Exception):
    """Try again later: 4xx, connection refused, timeouts, the relay's own 5xx."""


class PermanentDelivery(Exception):
    """The relay refused this mail or its recipient for good (5xx)."""

    def __init__(self, message: str, *, recipient: bool = False, size: bool = False) -> None:
        super().__init__(message)
        self.recipient = recipient  # refused at RCPT: the address itself
        self.size = size  # too large (552 / 5.3.4)


@dataclass
class Claimed:
    id: int
    kind: str
    recipient: str
    attempts: int
    created_at: Any
    ticket_id: int | None
    content: bytes | None  # None: read before sending (large)


class _Relay:
    """One reused connection to the relay."""

    def __init__(self, worker: OutboxWorker) -> None:
        self.worker = worker
        self.smtp: aiosmtplib.SMTP | None = None
        self.idle_since = 0.0

    async def connection(self) -> aiosmtplib.SMTP:
        if self.smtp is not None and self.smtp.is_connected:
            return self.smtp
        config = self.worker.config
        host, port = split_host_port(config.outbound.relay)
        smtp = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            start_tls=False,
            use_tls=False,
            timeout=config.outbound.connect_timeout,
            local_hostname=config.smtp.hostname,
        )
        try:
            await smtp.connect()
            await smtp.ehlo()
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            message = f"relay {host}:{port}: {type(exc).__name__}: {exc}"
            self.worker.relay_failed(message)
            raise TransientDelivery(message) from None
        self.smtp = smtp
        return smtp

    async def send(self, item: Claimed, content: bytes) -> None:
        for attempt in (1, 2):  # a reused connection may have been closed by the relay
            smtp = await self.connection()
            try:
                await self.transaction(smtp, item, content)
            except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, OSError) as exc:
                await self.close()
                if attempt == 2:
                    raise TransientDelivery(f"{type(exc).__name__}: {exc}") from None
                continue
            except aiosmtplib.SMTPTimeoutError as exc:
                await self.close()
                raise TransientDelivery(f"timeout: {exc}") from None
            except aiosmtplib.SMTPException as exc:
                await self.close()
                raise TransientDelivery(f"{type(exc).__name__}: {exc}") from None
            self.idle_since = self.worker.clock.monotonic()
            return

    async def transaction(self, smtp: aiosmtplib.SMTP, item: Claimed, content: bytes) -> None:
        """MAIL, RCPT, DATA with their own timeouts (RFC 5321 §4.5.3.2: DATA's end, 10 min)."""
        cfg = self.worker.config.outbound
        sender = self.worker.envelope_sender(item.id)
        utf8 = not (sender + item.recipient).isascii()
        options = ["SMTPUTF8"] if utf8 else []
        if smtp.supports_extension("dsn"):
            options.append("RET=HDRS")  # a bounce must not carry a live link back to us
        encoding = "utf-8" if utf8 else "ascii"
        try:
            await smtp.mail(sender, options=options, encoding=encoding, timeout=cfg.command_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await self.reset(smtp)
            # The relay refuses us, not this mail: its problem, retried.
            raise TransientDelivery(f"MAIL {exc.code} {exc.message}") from None
        try:
            await smtp.rcpt(item.recipient, encoding=encoding, timeout=cfg.command_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await self.reset(smtp)
            if exc.code >= 500:
                raise PermanentDelivery(f"RCPT {exc.code} {exc.message}", recipient=True) from None
            raise TransientDelivery(f"RCPT {exc.code} {exc.message}") from None
        try:
            await smtp.data(content, timeout=cfg.data_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await self.reset(smtp)
            if exc.code >= 500:
                size = exc.code == 552 or "5.3.4" in exc.message
                raise PermanentDelivery(f"DATA {exc.code} {exc.message}", size=size) from None
            raise TransientDelivery(f"DATA {exc.code} {exc.message}") from None

    async def reset(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.rset(timeout=self.worker.config.outbound.command_timeout)
        except Exception:
            await self.close()

    async def close_if_idle(self) -> None:
        idle = self.worker.clock.monotonic() - self.idle_since
        if self.smtp is not None and idle >= self.worker.config.outbound.idle_close_seconds:
            await self.close()

    async def close(self) -> None:
        smtp, self.smtp = self.smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await asyncio.wait_for(smtp.quit(), timeout=5)
        except Exception:
            smtp.close()


class OutboxWorker:
    def __init__(
        self,
        db: Database,
        config: Config,
        clock: Clock,
        log: Any,
        metrics: Metrics,
        *,
        instance: str,
        composer: Any = None,
        connections: int = 2,
        poll_seconds: float = 1.0,
        staff_folder: Any = None,
    ) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self.log = log
        self.metrics = metrics
        self.composer = composer  # for summaries of staff copies the relay finds too large
        self.instance = instance
        self.poll_seconds = poll_seconds  # mail queued by another process is seen this soon
        self.wakeup = asyncio.Event()
        self.relays = [_Relay(self) for _ in range(max(1, connections))]
        # IMAP mode's imap.staff_folder: staff copies are APPENDed there, not relayed.
        self.staff_folder = staff_folder
        # Held while rows are on the wire: a graceful stop waits for it, so a row the
        # relay accepted is marked sent and not sent again after a restart.
        self.delivering = asyncio.Lock()
        self._last_lease_check = float("-inf")
        self._accepted: dict[int, Claimed] = {}  # relay-accepted, "sent" not yet committed
        self._finishing = asyncio.Lock()  # one mark at a time; the next takes what came
        self._ready = asyncio.Event()  # something was accepted
        self._claimed: list[Claimed] = []  # claimed by us, not yet attempted
        # For /healthz: when the relay last took a mail, and the last failure.
        self.last_relay_success: float | None = None
        self.last_relay_failure: tuple[float, str] | None = None
        # For /healthz: the first failure since the relay last accepted a mail.
        self.relay_failing_since: float | None = None
        self.failing_since: float | None = None  # for /healthz: the loop's own errors

    def notify(self) -> None:
        self.wakeup.set()

    def envelope_sender(self, row_id: int) -> str:
        base = self.config.return_path_base
        return verp.envelope_sender(
            self.config.keys, row_id, base, self.config.smtp.recipient_delimiter or "+"
        )

    async def recover(self, *, all_claims: bool = False) -> int:
        """Take back rows a dead instance left in ``sending``: only expired leases
        (``all_claims`` only where no other instance can be running: SQLite under
        the instance lock)."""
        query = update(OutboxItem).where(OutboxItem.state == "sending")
        if not all_claims:
            query = query.where(
                or_(OutboxItem.claimed_until.is_(None), OutboxItem.claimed_until < self.clock.now())
            )
        async with self.db.transaction(priority="background") as session:
            result = await session.execute(
                query.values(state="queued", claimed_by=None, claimed_until=None)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def run(self) -> None:
        """Deliver until cancelled; a database outage backs off and never ends the loop."""
        backoff = 0.5
        try:
            while True:
                try:
                    await self.drain()
                    timeout = await self._seconds_to_next_due()
                    backoff = 0.5
                    if not self._accepted:
                        self.failing_since = None
                except Exception as exc:
                    self.failing_since = self.failing_since or self.clock.monotonic()
                    self.log.error("outbox.loop_error", error=f"{type(exc).__name__}: {exc}"[:300])
                    timeout, backoff = backoff, min(backoff * 2, 30.0)
                try:
                    async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                        await self.wakeup.wait()
                except TimeoutError:
                    for relay in self.relays:
                        await relay.close_if_idle()
                self.wakeup.clear()
        finally:
            for relay in self.relays:
                await relay.close()
            if self.staff_folder is not None:
                await self.staff_folder.close()

    async def drain(self) -> int:
        """Send everything that is due now; returns how many rows were attempted."""
        await self._finish_accepted()
        if self._accepted:
            return 0
        now = self.clock.monotonic()
        if now - self._last_lease_check > LEASE_SECONDS / 2:
            self._last_lease_check = now
            requeued = await self.recover()  # rows of instances that died
            if requeued:
                self.log.warning("outbox.requeued", rows=requeued)
        total = 0
        while True:
            if not self._claimed:
                self._claimed = await self._claim()
            if not self._claimed:
                return total
            async with self.delivering:
                senders = asyncio.gather(*(self._sender(relay) for relay in self.relays))
                await self._finisher(senders)
                done = await senders
            total += sum(done)
            await self._finish_accepted()
            if self._accepted:
                return total  # the marks did not commit: stop until they do

    async def _finisher(self, senders: asyncio.Future[Any]) -> None:
        """Mark what the relay accepted while the senders go on: each commit carries
        everything accepted since the last one (one fsync for many mails under load,
        one commit's time between a 250 and its mark)."""
        while True:
            self._ready.clear()
            await self._finish_accepted()
            if self._marks_failing:
                return  # the senders see it and stop
            if senders.done() and not self._accepted:
                return
            ready = asyncio.ensure_future(self._ready.wait())
            await asyncio.wait({ready, senders}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()

    async def _sender(self, relay: _Relay) -> int:
        """One connection's share of the claimed batch."""
        sent = 0
        while self._claimed and not self._marks_failing:
            item = self._claimed.pop(0)
            await self._deliver(relay, item)
            sent += 1
        return sent

    @property
    def _marks_failing(self) -> bool:
        """Accepted rows whose 'sent' did not commit: send nothing more until it does."""
        return bool(self._accepted) and self.failing_since is not None

    async def _seconds_to_next_due(self) -> float:
        if self._accepted:
            return 0.5
        async with self.db.read() as session:
            due = await session.scalar(
                select(func.min(OutboxItem.next_attempt_at)).where(OutboxItem.state == "queued")
            )
        idle = self.config.outbound.idle_close_seconds
        if due is None:
            return min(idle, self.poll_seconds)
        wait = (due - self.clock.now()).total_seconds()
        return min(max(wait, 0.05), idle, self.poll_seconds)

    async def _claim(self) -> list[Claimed]:
        now = self.clock.now()
        async with self.db.transaction(priority="background") as session:
            due = (
                select(OutboxItem.id)
                .where(OutboxItem.state == "queued", OutboxItem.next_attempt_at <= now)
                .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
                .limit(CLAIM_BATCH)
            )
            if not self.db.is_sqlite:
                due = due.with_for_update(skip_locked=True)
            rows = await session.execute(
                update(OutboxItem)
                .where(OutboxItem.id.in_(due.scalar_subquery()))
                .values(
                    state="sending",
                    attempts=OutboxItem.attempts + 1,
                    claimed_by=self.instance,
                    claimed_until=now + timedelta(seconds=LEASE_SECONDS),
                )
                .returning(
                    OutboxItem.id,
                    OutboxItem.kind,
                    OutboxItem.recipient,
                    OutboxItem.attempts,
                    OutboxItem.created_at,
                    OutboxItem.ticket_id,
                )
            )
            items = [Claimed(*row[:6], content=None) for row in rows]
        if not items:
            return []
        # Content is read with the batch when it is small; a large staff copy alone,
        # when it goes out, so a batch of them never sits in memory together.
        async with self.db.read() as session:
            contents = await session.execute(
                select(OutboxItem.id, OutboxItem.content).where(
                    OutboxItem.id.in_([i.id for i in items]),
                    func.length(OutboxItem.content) <= INLINE_CONTENT,
                )
            )
            by_id = dict(contents.all())
        for item in items:
            item.content = by_id.get(item.id)
        return sorted(items, key=lambda i: i.id)

    async def _content(self, item: Claimed) -> bytes:
        if item.content is not None:
            return item.content
        async with self.db.read() as session:
            content = await session.scalar(
                select(OutboxItem.content).where(OutboxItem.id == item.id)
            )
        return content or b""

    async def _deliver(self, relay: _Relay, item: Claimed) -> None:
        content = b""
        started = self.clock.monotonic()
        try:
            content = await self._content(item)
            if self.staff_folder is not None and item.kind == MailKind.STAFF.value:
                await self._append_staff(content)
            else:
                await relay.send(item, content)
        except PermanentDelivery as exc:
            await self._refused(item, exc, content)
            return
        except TransientDelivery as exc:
            await self._defer(item, str(exc))
            return
        except Exception as exc:  # never let one row stop the sender task
            await relay.close()
            await self._defer(item, f"{type(exc).__name__}: {exc}")
            return
        finally:
            item.content = None  # sent or not, it leaves memory
        self.last_relay_success = self.clock.monotonic()
        self.relay_failing_since = None
        self.metrics.observe("stage_seconds", self.last_relay_success - started, stage="deliver")
        self._accepted[item.id] = item
        self._ready.set()  # the finisher marks it sent
        self.log.info("outbox.sent", outbox=item.id, kind=item.kind, ticket_id=item.ticket_id)
        if item.kind == MailKind.AUTH_REQUEST.value:
            self.log.info("authlink.sent", outbox=item.id, ticket_id=item.ticket_id)
        self.metrics.inc("outbox_sent_total", kind=item.kind)

    async def _append_staff(self, content: bytes) -> None:
        try:
            await self.staff_folder.append(content)
        except Exception as exc:  # the server or the connection: retried like a 4xx
            raise TransientDelivery(f"imap staff folder: {type(exc).__name__}: {exc}") from None

    def relay_failed(self, error: str) -> None:
        """The relay could not be reached or did not answer in time (not a 5xx)."""
        now = self.clock.monotonic()
        self.last_relay_failure = (now, error[:300])
        if self.relay_failing_since is None:
            self.relay_failing_since = now

    async def release_claims(self) -> int:
        """On a graceful stop: rows this instance claimed but did not send go back."""
        await self._finish_accepted()
        self._claimed.clear()
        async with self.db.transaction(priority="background") as session:
            query = update(OutboxItem).where(
                OutboxItem.state == "sending", OutboxItem.claimed_by == self.instance
            )
            if self._accepted:  # accepted by the relay: never back in the queue
                query = query.where(OutboxItem.id.not_in(list(self._accepted)))
            result = await session.execute(
                query.values(state="queued", claimed_by=None, claimed_until=None)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _mine(self, row_id: int) -> Any:
        """Only while our claim holds: a peer may have taken back an expired lease."""
        return update(OutboxItem).where(
            OutboxItem.id == row_id,
            OutboxItem.state == "sending",
            OutboxItem.claimed_by == self.instance,
        )

    async def _finish_accepted(self) -> None:
        """Mark every relay-accepted row sent, in one commit, before intake's rivals.

        Sent mail is blanked: its content (codes, links, customers' messages)
        stays only where it went.
        """
        async with self._finishing:
            await self._finish()

    async def _finish(self) -> None:
        if not self._accepted:
            return
        pending = list(self._accepted)
        now = self.clock.now()
        try:
            async with self.db.transaction(priority="intake") as session:
                table = OutboxItem.__table__  # Core: one executemany
                await session.execute(
                    update(table)
                    .where(
                        table.c.id == bindparam("b_id"),
                        table.c.state == "sending",
                        table.c.claimed_by == self.instance,
                    )
                    .values(
                        state="sent",
                        sent_at=now,
                        last_error=None,
                        claimed_by=None,
                        claimed_until=None,
                        content=b"",
                    ),
                    [{"b_id": row_id} for row_id in pending],
                )
        except Exception as exc:
            self.failing_since = self.failing_since or self.clock.monotonic()
            self.log.error(
                "outbox.finish_failed",
                rows=pending[:20],
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        for row_id in pending:
            self._accepted.pop(row_id, None)

    async def _refused(self, item: Claimed, exc: PermanentDelivery, content: bytes) -> None:
        """A 5xx: final for customer mail; a staff copy is retried (or summarized)."""
        error = str(exc)
        if item.kind == MailKind.STAFF.value:
            summarized = b"X-IQ-Summary:" in content[:8192]
            if exc.size and self.composer is not None and not summarized:
                summary = self.composer.staff_summary(content)
                async with self.db.transaction(priority="normal") as session:
                    await session.execute(
                        self._mine(item.id).values(
                            content=summary,
                            state="queued",
                            next_attempt_at=self.clock.now(),
                            last_error=error[:2000],
                            claimed_by=None,
                            claimed_until=None,
                        )
                    )
                self.log.warning("outbox.staff_summarized", outbox=item.id, error=error[:300])
                return
            self.log.error("outbox.staff_refused", outbox=item.id, error=error[:300])
            await self._defer(item, error, never_give_up=True)
            return
        async with self.db.transaction(priority="normal") as session:
            result = await session.execute(
                self._mine(item.id).values(
                    state="failed", last_error=error[:2000], claimed_by=None, claimed_until=None
                )
            )
            # A row changed meanwhile (an erasure, an operator, a peer's recovery) is no
            # longer ours to act on: no suppression from the address we held in memory.
            if _changed(result):
                await self._failed_effects(session, item, error, recipient=exc.recipient)
        self.log.warning(
            "outbox.failed",
            outbox=item.id,
            kind=item.kind,
            ticket_id=item.ticket_id,
            error=error[:300],
        )
        self.metrics.inc("outbox_failed_total", kind=item.kind)

    async def _failed_effects(
        self, session: Any, item: Claimed, error: str, *, recipient: bool
    ) -> None:
        """A link that can no longer arrive is spent; a refused recipient is suppressed."""
        now = self.clock.now()
        if item.kind == MailKind.AUTH_REQUEST.value:
            await session.execute(
                update(AuthToken)
                .where(AuthToken.outbox_id == item.id, AuthToken.used_at.is_(None))
                .values(used_at=now)
            )
            await session.execute(
                update(OutboxItem).where(OutboxItem.id == item.id).values(content=b"")
            )
        hours = self.config.outbound.bounce_suppress_hours
        if recipient and hours and item.kind in CUSTOMER_KINDS:
            until = now + timedelta(hours=hours)
            row = await session.get(Suppression, item.recipient)
            if row is None:
                session.add(Suppression(email=item.recipient, reason=error[:500], until=until))
            else:
                row.until, row.reason = until, error[:500]

    def _gives_up(self, item: Claimed) -> bool:
        if item.kind == MailKind.STAFF.value:
            return False
        lifetime = timedelta(hours=self.config.outbound.queue_lifetime_hours)
        if item.kind == MailKind.AUTH_REQUEST.value:
            lifetime = min(lifetime, timedelta(hours=self.config.tickets.link_ttl_hours))
        return self.clock.now() - item.created_at >= lifetime

    async def _defer(self, item: Claimed, error: str, *, never_give_up: bool = False) -> None:
        cfg = self.config.outbound
        if error.startswith(("relay ", "timeout", "SMTP")):
            self.relay_failed(error)
        give_up = not never_give_up and self._gives_up(item)
        backoff = cfg.retry_base_seconds * (2 ** max(item.attempts - 1, 0))
        delay = min(backoff, cfg.retry_max_seconds)
        values: dict[str, Any] = {
            "last_error": error[:2000],
            "claimed_by": None,
            "claimed_until": None,
        }
        if give_up:
            values["state"] = "failed"
        else:
            values["state"] = "queued"
            values["next_attempt_at"] = self.clock.now() + timedelta(seconds=delay)
        async with self.db.transaction(priority="normal") as session:
            result = await session.execute(self._mine(item.id).values(**values))
            if give_up and _changed(result):
                await self._failed_effects(session, item, error, recipient=False)
        if give_up:
            self.log.warning(
                "outbox.failed",
                outbox=item.id,
                kind=item.kind,
                attempts=item.attempts,
                error=error[:300],
            )
            self.metrics.inc("outbox_failed_total", kind=item.kind)
        else:
            self.log.info(
                "outbox.deferred",
                outbox=item.id,
                kind=item.kind,
                attempts=item.attempts,
                retry_in=delay,
                error=error[:300],
            )
            self.metrics.inc("outbox_deferred_total", kind=item.kind)


def _changed(result: Any) -> bool:
    """The conditional UPDATE found the row still ours (rowcount as the driver reports)."""
    return int(getattr(result, "rowcount", 1) or 0) > 0
