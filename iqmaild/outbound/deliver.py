"""The outbox sender: the only place that talks SMTP to the relay.

Rows are claimed (``queued`` -> ``sending``), sent over one reused connection,
and marked ``sent`` right after the relay accepts. 4xx and connection errors
are retried with exponential backoff; 5xx is recorded as failed. Rows left in
``sending`` by a crash are re-queued on start (at-least-once towards the relay).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from datetime import timedelta
from typing import Any

import aiosmtplib
from sqlalchemy import or_, select, update

from iqmaild.config import Config, split_host_port
from iqmaild.metrics import Metrics
from iqmaild.storage.db import Database
from iqmaild.storage.models import OutboxItem, utcnow

CLAIM_BATCH = 10
# How long a claim holds: longer than the worst case of a batch (each mail two
# attempts of several SMTP commands, each up to connect_timeout on a stuck relay).
LEASE_SECONDS = 1800
# After sending, the link inside an auth request exists nowhere but the customer's mailbox.
REDACT_AFTER_SEND = frozenset({"auth_request"})


class TransientDelivery(Exception):
    """Try again later: 4xx, connection refused, timeouts."""


class PermanentDelivery(Exception):
    """The relay refused the mail for good (5xx)."""


class OutboxWorker:
    def __init__(self, db: Database, config: Config, log: Any, metrics: Metrics) -> None:
        self.db = db
        self.config = config
        self.log = log
        self.metrics = metrics
        self.wakeup = asyncio.Event()
        self._smtp: aiosmtplib.SMTP | None = None
        # Held while one row is on the wire: a graceful stop waits for it, so a row
        # the relay accepted is marked sent and not sent again after a restart.
        self.delivering = asyncio.Lock()
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._last_lease_check = float("-inf")
        self._idle_since = 0.0

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
                except Exception as exc:
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
        """Send everything that is due now; returns how many rows were attempted."""
        now = asyncio.get_running_loop().time()
        if now - self._last_lease_check > LEASE_SECONDS / 2:
            self._last_lease_check = now
            requeued = await self.recover(all_claims=False)  # rows of instances that died
            if requeued:
                self.log.warning("outbox.requeued", rows=requeued)
        total = 0
        while True:
            items = await self._claim()
            if not items:
                return total
            for item in items:
                async with self.delivering:
                    await self._deliver(item)
                total += 1

    async def _seconds_to_next_due(self) -> float:
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

    async def _deliver(self, item: OutboxItem) -> None:
        try:
            await self._send(item)
        except PermanentDelivery as exc:
            await self._finish(item, "failed", str(exc))
            self.log.warning(
                "outbox.failed",
                outbox=item.id,
                kind=item.kind,
                ticket_id=item.ticket_id,
                error=str(exc)[:300],
            )
            self.metrics.inc("outbox_failed_total", kind=item.kind)
            return
        except TransientDelivery as exc:
            await self._defer(item, str(exc))
            return
        except Exception as exc:  # never let one row stop the sender task
            await self._disconnect()
            await self._defer(item, f"{type(exc).__name__}: {exc}")
            return
        await self._finish(item, "sent", None)
        self.log.info("outbox.sent", outbox=item.id, kind=item.kind, ticket_id=item.ticket_id)
        if item.kind == "auth_request":
            self.log.info("authlink.sent", outbox=item.id, ticket_id=item.ticket_id)
        self.metrics.inc("outbox_sent_total", kind=item.kind)

    async def _send(self, item: OutboxItem) -> None:
        for attempt in (1, 2):  # a reused connection may have been closed by the relay
            smtp = await self._connection()
            try:
                options = [] if (item.mail_from + item.recipient).isascii() else ["SMTPUTF8"]
                errors, _ = await smtp.sendmail(
                    item.mail_from, [item.recipient], item.content, mail_options=options
                )
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = [r.code for r in exc.recipients]
                message = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
                if codes and all(c >= 500 for c in codes):
                    raise PermanentDelivery(message) from None
                raise TransientDelivery(message) from None
            except aiosmtplib.SMTPResponseException as exc:
                await self._disconnect()
                if exc.code >= 500:
                    raise PermanentDelivery(f"{exc.code} {exc.message}") from None
                raise TransientDelivery(f"{exc.code} {exc.message}") from None
            except (
                aiosmtplib.SMTPServerDisconnected,
                aiosmtplib.SMTPConnectError,
                aiosmtplib.SMTPTimeoutError,
                OSError,
            ) as exc:
                await self._disconnect()
                if attempt == 2:
                    raise TransientDelivery(f"{type(exc).__name__}: {exc}") from None
                continue
            except aiosmtplib.SMTPException as exc:
                await self._disconnect()
                raise TransientDelivery(f"{type(exc).__name__}: {exc}") from None
            if errors:
                raise TransientDelivery(str(errors))
            self._idle_since = asyncio.get_running_loop().time()
            return

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
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TransientDelivery(f"relay {host}:{port}: {type(exc).__name__}: {exc}") from None
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
        async with self.db.transaction(priority="background") as session:
            result = await session.execute(
                update(OutboxItem)
                .where(OutboxItem.state == "sending", OutboxItem.claimed_by == self.instance)
                .values(state="queued", claimed_by=None, claimed_until=None)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _mine(self, item: OutboxItem) -> Any:
        """Only while our claim holds: a peer may have taken back an expired lease."""
        return update(OutboxItem).where(
            OutboxItem.id == item.id,
            OutboxItem.state == "sending",
            OutboxItem.claimed_by == self.instance,
        )

    async def _finish(self, item: OutboxItem, state: str, error: str | None) -> None:
        values: dict[str, Any] = {
            "state": state,
            "last_error": error,
            "claimed_by": None,
            "claimed_until": None,
        }
        if state == "sent":
            values["sent_at"] = utcnow()
        if item.kind in REDACT_AFTER_SEND:
            values["content"] = b""
        async with self.db.transaction(priority="background") as session:
            await session.execute(self._mine(item).values(**values))

    async def _defer(self, item: OutboxItem, error: str) -> None:
        cfg = self.config.outbound
        give_up = item.attempts >= cfg.max_attempts
        delay = min(cfg.retry_base_seconds * (2 ** (item.attempts - 1)), cfg.retry_max_seconds)
        values: dict[str, Any] = {
            "last_error": error[:2000],
            "claimed_by": None,
            "claimed_until": None,
        }
        if give_up:
            values["state"] = "failed"
            if item.kind in REDACT_AFTER_SEND:
                values["content"] = b""
        else:
            values["state"] = "queued"
            values["next_attempt_at"] = utcnow() + timedelta(seconds=delay)
        async with self.db.transaction(priority="background") as session:
            await session.execute(self._mine(item).values(**values))
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
