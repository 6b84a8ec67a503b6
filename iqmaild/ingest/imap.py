"""IMAP intake: a desk mailbox's folder into the same pipeline as SMTP.

One connection watches the folder (IDLE; polling when the server has no
IDLE), takes new messages in bounded batches (``UID FETCH``, never the whole
backlog in memory) and stores each batch with ``GroupCommitter.store_batch``
together with the folder's last UID and the list of UIDs to file. Once the
classifier has decided a message (it may be another process), it is filed
into the decision's folder with a keyword naming its ticket. So a message is
moved only after its commit and its decision, and a restart or a cut
connection neither skips a message (the last UID only moves with a commit)
nor stores one twice (the delivery index; a re-fetch is a duplicate whose
filing follows the stored verdict). Reconnects back off exponentially.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import Any

from iqmaild.clock import Clock
from iqmaild.config import Config
from iqmaild.core.vocabulary import Decision
from iqmaild.imap import filing
from iqmaild.imap.client import ImapDisconnected, ImapError, ImapSession
from iqmaild.metrics import Metrics
from iqmaild.persist import mailbox
from iqmaild.persist.store import GroupCommitter, Incoming
from iqmaild.storage.db import Database

FILING_BATCH = 200


class ImapIntake:
    def __init__(
        self,
        config: Config,
        committer: GroupCommitter,
        db: Database,
        clock: Clock,
        log: Any,
        metrics: Metrics,
    ) -> None:
        imap = config.imap
        self.config = imap
        self.committer = committer
        self.db = db
        self.clock = clock
        self.log = log
        self.metrics = metrics
        self.key = f"{imap.user}@{imap.host}:{imap.effective_port}/{imap.folder}"
        self.folders = {
            Decision.AUTHORIZED.value: imap.folders.authorized,
            Decision.PENDING.value: imap.folders.pending,
            Decision.UNAUTHORIZED.value: imap.folders.unauthorized,
            Decision.IGNORED.value: imap.folders.ignored,
        }
        self.desk = config.smtp.desk_addresses[0]
        self.filing_poll = config.processing.poll_seconds
        self.session: ImapSession | None = None
        # For /healthz and the tests: connected, and since when it fails.
        self.connected = False
        self.failing_since: float | None = None
        self.connections = 0
        # Filing the server refused: tried again after a growing pause, not every poll.
        self.filing_failures = 0
        self.filing_retry_at = float("-inf")

    async def run(self) -> None:
        """Watch until cancelled; every failure reconnects after a growing delay."""
        delay = 1.0
        while True:
            session = ImapSession(self.config)
            self.session = session
            try:
                await session.connect()
                self.connections += 1
                await self._serve(session)
            except (ImapDisconnected, OSError, TimeoutError) as exc:
                self._failed("imap.disconnected", exc, delay)
            except ImapError as exc:  # a refusal: wrong password, a folder we may not use
                self._failed("imap.refused", exc, delay)
            except Exception as exc:  # the database, or a bug: never end the loop
                self._failed("imap.loop_error", exc, delay)
            finally:
                if self.connected:  # it worked for a while: start the backoff over
                    delay = 1.0
                self.connected = False
                with contextlib.suppress(Exception):
                    await session.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.reconnect_max_seconds)

    def _failed(self, event: str, exc: BaseException, delay: float) -> None:
        self.failing_since = self.failing_since or self.clock.monotonic()
        level = self.log.warning if event == "imap.disconnected" else self.log.error
        level(
            event,
            host=self.config.host,
            folder=self.config.folder,
            error=f"{type(exc).__name__}: {exc}"[:300],
            retry_in=delay,
        )
        self.metrics.inc("imap_reconnects_total")

    async def _serve(self, session: ImapSession) -> None:
        created = await session.ensure_folders([self.config.folder, *self.folders.values()])
        if created:
            self.log.info("imap.folders_created", folders=created)
        validity, _ = await session.select(self.config.folder)
        last = await self._position(validity)
        idle = session.has("IDLE")
        self.connected, self.failing_since = True, None
        self.log.info(
            "imap.connected",
            host=self.config.host,
            folder=self.config.folder,
            uidvalidity=validity,
            last_uid=last,
            idle=idle,
            move=session.has("MOVE"),
        )
        while True:
            last = await self._take_new(session, validity, last)
            await self._file_ready(session, validity)
            waiting = await mailbox.waiting(self.db, self.key, validity)
            if idle and waiting:  # look at the verdicts every poll interval
                await session.idle(self.filing_poll)
            elif idle:  # renewed well before the server's 29 minutes
                if not await session.idle(self.config.idle_renew_seconds):
                    self.log.info("imap.idle_renewed", folder=self.config.folder)
            else:
                await asyncio.sleep(self.filing_poll if waiting else self.config.poll_seconds)
                await session.noop()

    async def _position(self, validity: int) -> int:
        """The last UID taken, or 0 when the folder is new or its UIDVALIDITY changed."""
        known = await mailbox.load(self.db, self.key)
        if known is not None and known[0] == validity:
            return known[1]
        if known is not None:
            self.log.warning(
                "imap.uidvalidity_changed",
                folder=self.config.folder,
                old=known[0],
                new=validity,
                hint="the folder is taken again from its start; stored mail is not stored twice",
            )
        await mailbox.start_over(self.db, self.key, validity, self.clock.now())
        return 0

    async def _take_new(self, session: ImapSession, validity: int, last: int) -> int:
        """Every message above ``last``, a bounded batch at a time; the new last UID."""
        uids = await session.uids_above(last)
        window = self.config.batch_size
        for start in range(0, len(uids), window):
            chunk = uids[start : start + window]
            sizes = await session.sizes(chunk)
            for batch in filing.batches(
                sizes.items(), self.config.batch_size, self.config.max_batch_bytes
            ):
                await self._store(session, validity, batch, sizes)
            last = max(last, *chunk)
        return last

    async def _store(
        self, session: ImapSession, validity: int, batch: list[int], sizes: dict[int, int]
    ) -> None:
        fetched = await session.bodies(batch, sum(sizes.get(uid, 0) for uid in batch))
        if not fetched:
            return  # expunged by someone meanwhile
        items = []
        for _, raw in fetched:
            sender, recipients = filing.envelope(raw, self.desk)
            items.append(
                Incoming(
                    raw=raw,
                    mail_from=sender,
                    rcpt_to=recipients,
                    channel="imap",
                    peer=f"imap:{self.config.host}"[:128],
                )
            )
        uids = [uid for uid, _ in fetched]
        record = mailbox.recorder(self.db, self.key, validity, uids, max(batch), self.clock.now())
        stored = await self.committer.store_batch(items, record)
        self.log.info(
            "imap.batch",
            messages=len(items),
            bytes=sum(len(i.raw) for i in items),
            first_uid=uids[0],
            last_uid=uids[-1],
        )
        for uid, item, result in zip(uids, items, stored, strict=True):
            self.log.info(
                "imap.accepted",
                message=result.id,
                uid=uid,
                size=len(item.raw),
                duplicate=result.duplicate,
            )
        self.metrics.inc("imap_accepted_total", len(stored))

    async def _file_ready(self, session: ImapSession, validity: int) -> None:
        """Keywords first (they travel with the message), then one MOVE per folder."""
        if self.clock.monotonic() < self.filing_retry_at:
            return
        while True:
            rows = await mailbox.ready(self.db, self.key, validity, FILING_BATCH)
            if not rows:
                return
            by_keywords: dict[tuple[str, ...], list[int]] = defaultdict(list)
            by_folder: dict[str | None, list[int]] = defaultdict(list)
            folder_of: dict[int, str | None] = {}
            for row in rows:
                plan = filing.filing_for(
                    row.decision,
                    row.state,
                    row.ticket_number,
                    self.folders,
                    self.config.keyword_prefix,
                )
                by_keywords[plan.keywords].append(row.uid)
                by_folder[plan.folder].append(row.uid)
                folder_of[row.uid] = plan.folder
            uids = [row.uid for row in rows]
            try:
                await session.add_keywords_many([(g, k) for k, g in by_keywords.items()])
                for folder, group in by_folder.items():
                    if folder is not None:
                        await session.move(group, folder)
            except ImapDisconnected:
                raise
            except ImapError as exc:
                # A folder deleted meanwhile, or a server refusal: made again, tried later.
                self.filing_failures += 1
                pause = min(2.0**self.filing_failures, 300.0)
                self.filing_retry_at = self.clock.monotonic() + pause
                self.log.error(
                    "imap.filing_failed", error=str(exc)[:300], uids=uids[:20], retry_in=pause
                )
                await mailbox.filing_failed(self.db, self.key, validity, uids, str(exc))
                await session.ensure_folders(list(self.folders.values()))
                return
            await mailbox.filed(self.db, self.key, validity, uids)
            self.filing_failures = 0
            for row in rows:
                self.log.info(
                    "imap.filed",
                    message=row.message,
                    uid=row.uid,
                    decision=row.decision,
                    ticket=row.ticket_number,
                    folder=folder_of[row.uid],
                )
            for folder, group in by_folder.items():
                self.metrics.inc("imap_filed_total", len(group), folder=folder or "none")
            if len(rows) < FILING_BATCH:
                return
