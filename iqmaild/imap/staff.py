"""Staff delivery by IMAP APPEND (``imap.staff_folder``), used by the outbox."""

from __future__ import annotations

import asyncio

from iqmaild.config import ImapConfig
from iqmaild.imap.client import ImapDisconnected, ImapSession


class StaffFolder:
    """Staff delivery by APPEND into ``imap.staff_folder`` instead of SMTP.

    One connection of its own (the intake's is watching), opened when the
    first staff copy goes out, made again after it drops; the folder is
    created if missing. Failures surface to the outbox, which retries.
    """

    def __init__(self, config: ImapConfig) -> None:
        self.config = config
        self.session: ImapSession | None = None
        self.lock = asyncio.Lock()

    async def append(self, raw: bytes) -> None:
        async with self.lock:
            for attempt in (1, 2):  # a kept connection may have been closed by the server
                session = await self._session()
                try:
                    await session.append(raw, self.config.staff_folder)
                    return
                except ImapDisconnected:
                    await self.close()
                    if attempt == 2:
                        raise

    async def _session(self) -> ImapSession:
        if self.session is not None and not self.session.lost.done():
            return self.session
        await self.close()
        session = ImapSession(self.config)
        try:
            await session.connect()
            await session.ensure_folders([self.config.staff_folder])
        except BaseException:
            await session.close()
            raise
        self.session = session
        return session

    async def close(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()
