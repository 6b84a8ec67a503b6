"""The outbox sender: the only place that talks SMTP to the relay.

Rows are claimed (``queued`` -> ``sending``, a lease), sent over one reused
connection with our signed envelope sender (VERP: a report names its row), and
marked ``sent`` the moment the relay accepts, at intake priority, retried in
memory until the mark commits: a row the relay took is never sent again by this
instance. Retries back off; customer mail gives up after the queue lifetime
(Postfix's 5 days by default; a link after its own validity), staff copies
never (an operator acts, /healthz and the log say so). A 5xx for a recipient
is final for customer mail and suppresses automatic mail to that address; a 5xx
for the relay's own reasons (greeting, MAIL) is the relay's fault and retried.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import aiosmtplib
from sqlalchemy import or_, select, update
from sqlalchemy.orm import defer

from iqmaild.config import Config, split_host_port
from iqmaild.core import verp
from iqmaild.core.vocabulary import AUTOMATIC_MAIL, MailKind
from iqmaild.metrics import Metrics
from iqmaild.storage.db import Database
from iqmaild.storage.models import AuthToken, OutboxItem, Suppression, utcnow

CLAIM_BATCH = 10
# How long a claim holds: longer than the worst case of a batch.
LEASE_SECONDS = 1800
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
class _Accepted:
    """A row the relay accepted whose ``sent`` mark has not committed yet."""

    item: OutboxItem
    tries: int = 0


class OutboxWorker:
    def __init__(
        self, db: Database, config: Config, log: Any, metrics: Metrics, composer: Any = None
    ) -> None:
        self.db = db
        self.config = config
        self.log = log
        self.metrics = metrics
        self.composer = composer  # for summaries of staff copies the relay finds too large
        self.wakeup = asyncio.Event()
        self._smtp: aiosmtplib.SMTP | None = None
        # Held while one row is on the wire: a graceful stop waits for it, so a row
        # the relay accepted is marked sent and not sent again after a restart.
        self.delivering = asyncio.Lock()
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._last_lease_check = float("-inf")
        self._idle_since = 0.0
        self._accepted: dict[int, _Accepted] = {}
        self._claimed: list[OutboxItem] = []  # claimed by us, not yet attempted
        # For /healthz: when the relay last took a mail, and the last failure.
        self.last_relay_success: float | None = None
        self.last_relay_failure: tuple[float, str] | None = None
        self.failing_since: float | None = None  # for /healthz: the loop's own errors

    def notify(self) -> None:
        self.wakeup.set()

    async def recover(self, *, all_claims: bool | None = None) -> int:
        """Re-queue rows a dead instance left in ``sending``.

        SQLite has one instance, so at start every claim is stale; with several
        instances on PostgreSQL only claims whose lease ran out are taken back.
        """
        if all_claims is None:
            all_claims = self.db.is_sqlite
        query = update(OutboxItem).where(OutboxItem.state == "sending")
        if not all_claims:
            query = query.where(
                or_(OutboxItem.claimed_until.is_(None), OutboxItem.claimed_until < utcnow())
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
                    self.failing_since = None if not self._accepted else self.failing_since
                except Exception as exc:
                    now = asyncio.get_running_loop().time()
                    self.failing_since = self.failing_since or now
                    self.log.error("outbox.loop_error", error=f"{type(exc).__name__}: {exc}"[:300])
                    timeout, backoff = backoff, min(backoff * 2, 30.0)
                try:
                    async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel
                        await self.wakeup.wait()
                except TimeoutError:
                    await self._close_if_idle()
                self.wakeup.clear()
        finally:
            await self._disconnect()

    async def drain(self) -> int:
        """Send everything that is due now; returns how many rows were attempted.

        While the database does not take the 'sent' mark of a row the relay
        accepted, nothing more is sent: every such row is a duplicate if we die.
        """
        await self._finish_accepted()
        if self._accepted:
            return 0
        now = asyncio.get_running_loop().time()
        if now - self._last_lease_check > LEASE_SECONDS / 2:
            self._last_lease_check = now
            requeued = await self.recover(all_claims=False)  # rows of instances that died
            if requeued:
                self.log.warning("outbox.requeued", rows=requeued)
        total = 0
        while True:
            if not self._claimed:
                self._claimed = await self._claim()
            if not self._claimed:
                return total
            while self._claimed:
                item = self._claimed.pop(0)
                async with self.delivering:
                    await self._deliver(item)
                total += 1
                if self._accepted:
                    return total  # its mark did not commit: stop until it does

    async def _seconds_to_next_due(self) -> float:
        if self._accepted:
            return 0.5
        async with self.db.read() as session:
            due = await session.scalar(
                select(OutboxItem.next_attempt_at)
                .where(OutboxItem.state == "queued")
                .order_by(OutboxItem.next_attempt_at)
                .limit(1)
            )
        if due is None:
            return self.config.outbound.idle_close_seconds
        wait = (due - utcnow()).total_seconds()
        return min(max(wait, 0.05), self.config.outbound.idle_close_seconds)

    async def _claim(self) -> list[OutboxItem]:
        async with self.db.transaction(priority="background") as session:
            query = (
                select(OutboxItem)
                # Content is read one row at a time, when it goes out: a batch of
                # large staff copies must not sit in memory together.
                .options(defer(OutboxItem.content))
                .where(OutboxItem.state == "queued", OutboxItem.next_attempt_at <= utcnow())
                .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
                .limit(CLAIM_BATCH)
            )
            if not self.db.is_sqlite:
                query = query.with_for_update(skip_locked=True)
            items = list(await session.scalars(query))
            lease = utcnow() + timedelta(seconds=LEASE_SECONDS)
            for item in items:
                item.state = "sending"
                item.attempts += 1
                item.claimed_by, item.claimed_until = self.instance, lease
        return items

    async def _content(self, item: OutboxItem) -> bytes:
        async with self.db.read() as session:
            content = await session.scalar(
                select(OutboxItem.content).where(OutboxItem.id == item.id)
            )
        return content or b""

    async def _deliver(self, item: OutboxItem) -> None:
        try:
            content = await self._content(item)
            await self._send(item, content)
        except PermanentDelivery as exc:
            await self._refused(item, exc, content)
            return
        except TransientDelivery as exc:
            await self._defer(item, str(exc))
            return
        except Exception as exc:  # never let one row stop the sender task
            await self._disconnect()
            await self._defer(item, f"{type(exc).__name__}: {exc}")
            return
        self.last_relay_success = asyncio.get_running_loop().time()
        self._accepted[item.id] = _Accepted(item)
        await self._finish_accepted()
        self.log.info("outbox.sent", outbox=item.id, kind=item.kind, ticket_id=item.ticket_id)
        if item.kind == MailKind.AUTH_REQUEST.value:
            self.log.info("authlink.sent", outbox=item.id, ticket_id=item.ticket_id)
        self.metrics.inc("outbox_sent_total", kind=item.kind)

    def envelope_sender(self, item: OutboxItem) -> str:
        base = self.config.return_path_base
        return verp.envelope_sender(
            self.config.key, item.id, base, self.config.smtp.recipient_delimiter or "+"
        )

    async def _send(self, item: OutboxItem, content: bytes) -> None:
        for attempt in (1, 2):  # a reused connection may have been closed by the relay
            smtp = await self._connection()
            try:
                await self._transaction(smtp, item, content)
            except (
                aiosmtplib.SMTPServerDisconnected,
                aiosmtplib.SMTPConnectError,
                OSError,
            ) as exc:
                await self._disconnect()
                if attempt == 2:
                    raise TransientDelivery(f"{type(exc).__name__}: {exc}") from None
                continue
            except aiosmtplib.SMTPTimeoutError as exc:
                await self._disconnect()
                raise TransientDelivery(f"timeout: {exc}") from None
            except aiosmtplib.SMTPException as exc:
                await self._disconnect()
                raise TransientDelivery(f"{type(exc).__name__}: {exc}") from None
            self._idle_since = asyncio.get_running_loop().time()
            return

    async def _transaction(self, smtp: aiosmtplib.SMTP, item: OutboxItem, content: bytes) -> None:
        """MAIL, RCPT, DATA with their own timeouts (RFC 5321 §4.5.3.2: DATA's end, 10 min)."""
        cfg = self.config.outbound
        sender = self.envelope_sender(item)
        utf8 = not (sender + item.recipient).isascii()
        options = ["SMTPUTF8"] if utf8 else []
        if smtp.supports_extension("dsn"):
            options.append("RET=HDRS")  # a bounce must not carry a live link back to us
        encoding = "utf-8" if utf8 else "ascii"
        try:
            await smtp.mail(sender, options=options, encoding=encoding, timeout=cfg.command_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(smtp)
            # The relay refuses us, not this mail: its problem, retried.
            raise TransientDelivery(f"MAIL {exc.code} {exc.message}") from None
        try:
            await smtp.rcpt(item.recipient, encoding=encoding, timeout=cfg.command_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(smtp)
            if exc.code >= 500:
                raise PermanentDelivery(f"RCPT {exc.code} {exc.message}", recipient=True) from None
            raise TransientDelivery(f"RCPT {exc.code} {exc.message}") from None
        try:
            await smtp.data(content, timeout=cfg.data_timeout)
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset(smtp)
            if exc.code >= 500:
                size = exc.code == 552 or "5.3.4" in exc.message
                raise PermanentDelivery(f"DATA {exc.code} {exc.message}", size=size) from None
            raise TransientDelivery(f"DATA {exc.code} {exc.message}") from None

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.rset(timeout=self.config.outbound.command_timeout)
        except Exception:
            await self._disconnect()

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        host, port = split_host_port(self.config.outbound.relay)
        smtp = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            start_tls=False,
            use_tls=False,
            timeout=self.config.outbound.connect_timeout,
            local_hostname=self.config.smtp.hostname,
        )
        try:
            await smtp.connect()
            await smtp.ehlo()
        except (aiosmtplib.SMTPException, OSError) as exc:
            smtp.close()
            message = f"relay {host}:{port}: {type(exc).__name__}: {exc}"
            self.last_relay_failure = (asyncio.get_running_loop().time(), message[:300])
            raise TransientDelivery(message) from None
        self._smtp = smtp
        return smtp

    async def _close_if_idle(self) -> None:
        if self._smtp is None:
            return
        idle = asyncio.get_running_loop().time() - self._idle_since
        if idle >= self.config.outbound.idle_close_seconds:
            await self._disconnect()

    async def _disconnect(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await asyncio.wait_for(smtp.quit(), timeout=5)
        except Exception:
            smtp.close()

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

    def _mine(self, item: OutboxItem) -> Any:
        """Only while our claim holds: a peer may have taken back an expired lease."""
        return update(OutboxItem).where(
            OutboxItem.id == item.id,
            OutboxItem.state == "sending",
            OutboxItem.claimed_by == self.instance,
        )

    async def _finish_accepted(self) -> None:
        """Mark every relay-accepted row sent, first of all work and before intake's rivals.

        Sent mail is blanked: its content (codes, links, customers' messages)
        stays only where it went.
        """
        if not self._accepted:
            return
        pending = list(self._accepted.values())
        try:
            async with self.db.transaction(priority="intake") as session:
                for entry in pending:
                    await session.execute(
                        self._mine(entry.item).values(
                            state="sent",
                            sent_at=utcnow(),
                            last_error=None,
                            claimed_by=None,
                            claimed_until=None,
                            content=b"",
                        )
                    )
        except Exception as exc:
            self.failing_since = self.failing_since or asyncio.get_running_loop().time()
            for entry in pending:
                entry.tries += 1
            self.log.error(
                "outbox.finish_failed",
                rows=[e.item.id for e in pending][:20],
                tries=pending[0].tries,
                error=f"{type(exc).__name__}: {exc}"[:300],
            )
            return
        for entry in pending:
            self._accepted.pop(entry.item.id, None)

    async def _refused(self, item: OutboxItem, exc: PermanentDelivery, content: bytes) -> None:
        """A 5xx: final for customer mail; a staff copy is retried (or summarized)."""
        error = str(exc)
        if item.kind == MailKind.STAFF.value:
            summarized = b"X-IQ-Summary:" in content[:8192]
            if exc.size and self.composer is not None and not summarized:
                summary = self.composer.staff_summary(content)
                async with self.db.transaction(priority="normal") as session:
                    await session.execute(
                        self._mine(item).values(
                            content=summary,
                            state="queued",
                            next_attempt_at=utcnow(),
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
        values: dict[str, Any] = {
            "state": "failed",
            "last_error": error[:2000],
            "claimed_by": None,
            "claimed_until": None,
        }
        async with self.db.transaction(priority="normal") as session:
            await session.execute(self._mine(item).values(**values))
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
        self, session: Any, item: OutboxItem, error: str, *, recipient: bool
    ) -> None:
        """A link that can no longer arrive is spent; a refused recipient is suppressed."""
        if item.kind == MailKind.AUTH_REQUEST.value:
            await session.execute(
                update(AuthToken)
                .where(AuthToken.outbox_id == item.id, AuthToken.used_at.is_(None))
                .values(used_at=utcnow())
            )
            await session.execute(self._blank(item))
        hours = self.config.outbound.bounce_suppress_hours
        if recipient and hours and item.kind in CUSTOMER_KINDS:
            until = utcnow() + timedelta(hours=hours)
            row = await session.get(Suppression, item.recipient)
            if row is None:
                session.add(Suppression(email=item.recipient, reason=error[:500], until=until))
            else:
                row.until, row.reason = until, error[:500]

    def _blank(self, item: OutboxItem) -> Any:
        return update(OutboxItem).where(OutboxItem.id == item.id).values(content=b"")

    def _gives_up(self, item: OutboxItem) -> bool:
        if item.kind == MailKind.STAFF.value:
            return False
        lifetime = timedelta(hours=self.config.outbound.queue_lifetime_hours)
        if item.kind == MailKind.AUTH_REQUEST.value:
            lifetime = min(lifetime, timedelta(hours=self.config.tickets.link_ttl_hours))
        return utcnow() - item.created_at >= lifetime

    async def _defer(self, item: OutboxItem, error: str, *, never_give_up: bool = False) -> None:
        cfg = self.config.outbound
        if error.startswith(("relay ", "timeout", "SMTP")):
            self.last_relay_failure = (asyncio.get_running_loop().time(), error[:300])
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
            values["next_attempt_at"] = utcnow() + timedelta(seconds=delay)
        async with self.db.transaction(priority="normal") as session:
            await session.execute(self._mine(item).values(**values))
            if give_up:
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
