"""One IMAP connection (aioimaplib): TLS, STARTTLS or plain, login, and the few
commands IMAP mode needs, each bounded by a timeout and by the connection.

aioimaplib leaves a command waiting forever when the connection drops; here
every command races the connection's end, so a cut connection is an
``ImapDisconnected`` at once and the caller reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable
from typing import Any, TypeVar

import aioimaplib

from iqmaild.config import ImapConfig
from iqmaild.imap import filing

T = TypeVar("T")
PIPELINE = 32  # commands in flight together (keywords of many tickets)


class ImapError(Exception):
    """The server refused a command (NO/BAD), or spoke something we cannot use."""


class ImapDisconnected(ImapError):
    """The connection ended or a command timed out: reconnect."""


def _tls_context(config: ImapConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=config.ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _text(response: Any) -> str:
    lines = [bytes(x) for x in response.lines if isinstance(x, bytes | bytearray)]
    return b" ".join(lines[-2:]).decode("utf-8", "replace")[:300]


class ImapSession:
    """A logged-in connection; ``async with ImapSession.open(config)``."""

    def __init__(self, config: ImapConfig) -> None:
        self.config = config
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.imap: aioimaplib.IMAP4 | None = None
        self.selected: str | None = None

    def _on_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    async def _guard(self, work: Awaitable[T], what: str, timeout: float | None = None) -> T:
        """The command's answer, or ImapDisconnected when the connection ends first."""
        task = asyncio.ensure_future(work)
        limit = self.config.timeout_seconds if timeout is None else timeout
        try:
            done, _ = await asyncio.wait(
                {task, self.lost}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:
            task.cancel()
            raise
        if task in done:
            try:
                return task.result()
            except (TimeoutError, aioimaplib.CommandTimeout):
                raise ImapDisconnected(f"{what}: timed out") from None
            except aioimaplib.Abort as exc:
                raise ImapDisconnected(f"{what}: {exc}") from None
            except OSError as exc:
                raise ImapDisconnected(f"{what}: {type(exc).__name__}: {exc}") from None
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if self.lost.done():
            raise ImapDisconnected(f"{what}: connection lost")
        raise ImapDisconnected(f"{what}: no answer in {limit:g} s")

    async def _ok(self, work: Awaitable[Any], what: str, timeout: float | None = None) -> Any:
        response = await self._guard(work, what, timeout)
        if response.result != "OK":
            raise ImapError(f"{what}: {response.result} {_text(response)}")
        return response

    async def connect(self) -> None:
        config = self.config
        context = _tls_context(config) if config.security == "tls" else None
        self.imap = aioimaplib.IMAP4(
            host=config.host,
            port=config.effective_port,
            timeout=config.timeout_seconds,
            conn_lost_cb=self._on_lost,
            ssl_context=context,
        )
        await self._guard(self.imap.wait_hello_from_server(), "connect")
        if config.security == "starttls":
            await self._starttls()
        password = config.read_password()
        await self._ok(self.imap.login(config.user, password), "LOGIN")
        # Asked again: aioimaplib adds the login answer's list to the greeting's,
        # and the greeting's (before login) may name IDLE or MOVE that the
        # logged-in session has not.
        await self._guard(self.imap.protocol.capability(), "CAPABILITY")

    async def _starttls(self) -> None:
        """aioimaplib has no STARTTLS: the command, then TLS on the same transport.

        A server without STARTTLS is refused: we never fall back to clear text.
        """
        assert self.imap is not None
        protocol = self.imap.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError("STARTTLS: the server does not offer it (refusing clear text)")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        await self._ok(protocol.execute(command), "STARTTLS")
        loop = asyncio.get_running_loop()
        transport = await self._guard(
            loop.start_tls(
                protocol.transport,
                protocol,
                _tls_context(self.config),
                server_hostname=self.config.host,
            ),
            "STARTTLS handshake",
        )
        protocol.transport = transport
        await self._guard(protocol.capability(), "CAPABILITY")  # RFC 3501: ask again

    @property
    def capabilities(self) -> set[str]:
        assert self.imap is not None
        return {c.upper() for c in self.imap.protocol.capabilities}

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    async def close(self) -> None:
        imap, self.imap = self.imap, None
        if imap is None:
            return
        if not self.lost.done():
            with contextlib.suppress(Exception):
                await self._guard(imap.logout(), "LOGOUT", timeout=5)
        transport = getattr(imap.protocol, "transport", None)
        if transport is not None:
            transport.close()
        for task in list(imap.tasks) + list(imap.protocol.tasks):
            task.cancel()

    # -- folders ---------------------------------------------------------------

    async def ensure_folders(self, names: list[str]) -> list[str]:
        """CREATE the folders that are missing; the names created."""
        assert self.imap is not None
        created = []
        for name in dict.fromkeys(names):
            if name.upper() == "INBOX":
                continue
            response = await self._ok(self.imap.list('""', filing.quote(name)), "LIST")
            if filing.listed(response.lines):
                continue
            response = await self._guard(self.imap.create(filing.quote(name)), "CREATE")
            if response.result == "OK":
                created.append(name)
            elif (
                b"ALREADYEXISTS"
                not in b" ".join(x for x in response.lines if isinstance(x, bytes)).upper()
            ):
                raise ImapError(f"CREATE {name}: {response.result} {_text(response)}")
        return created

    async def select(self, name: str) -> tuple[int, int | None]:
        """SELECT; (UIDVALIDITY, UIDNEXT)."""
        assert self.imap is not None
        response = await self._ok(self.imap.select(filing.quote(name)), f"SELECT {name}")
        validity, uidnext = filing.select_status(response.lines)
        if validity is None:
            raise ImapError(f"SELECT {name}: the server named no UIDVALIDITY")
        self.selected = name
        return validity, uidnext

    # -- messages ---------------------------------------------------------------

    async def uids_above(self, last_uid: int) -> list[int]:
        assert self.imap is not None
        response = await self._ok(
            self.imap.protocol.search(f"UID {last_uid + 1}:*", by_uid=True, charset=None),
            "UID SEARCH",
        )
        return filing.search_uids(response.lines, last_uid)

    async def sizes(self, uids: list[int]) -> dict[int, int]:
        assert self.imap is not None
        if not uids:
            return {}
        response = await self._ok(
            self.imap.uid("fetch", filing.uid_set(uids), "(UID RFC822.SIZE)"), "UID FETCH SIZE"
        )
        return filing.fetch_sizes(response.lines)

    def _transfer_timeout(self, size: int) -> float:
        """Large transfers get time by their size (at least 100 kB/s)."""
        return self.config.timeout_seconds + size / 100_000

    async def bodies(self, uids: list[int], size: int = 0) -> list[tuple[int, bytes]]:
        """(UID, raw) of the messages still there; BODY.PEEK leaves \\Seen alone."""
        assert self.imap is not None
        if not uids:
            return []
        response = await self._ok(
            self.imap.uid("fetch", filing.uid_set(uids), "(UID BODY.PEEK[])"),
            "UID FETCH BODY",
            self._transfer_timeout(size),
        )
        return filing.fetch_bodies(response.lines)

    async def add_keywords(self, uids: list[int], keywords: tuple[str, ...]) -> None:
        assert self.imap is not None
        if not keywords or not uids:
            return
        await self._ok(
            self.imap.uid(
                "store", filing.uid_set(uids), "+FLAGS.SILENT", f"({' '.join(keywords)})"
            ),
            "UID STORE",
        )

    async def add_keywords_many(self, groups: list[tuple[list[int], tuple[str, ...]]]) -> None:
        """Several ``UID STORE +FLAGS.SILENT`` pipelined (one keyword per ticket means
        one STORE per message: 5,000 round trips one after the other took a minute).

        aioimaplib runs one command per untagged-response name at a time; each
        STORE gets a name of its own, and ``.SILENT`` asks for no untagged answer.
        """
        assert self.imap is not None
        protocol = self.imap.protocol
        pending = [(uids, words) for uids, words in groups if uids and words]
        for start in range(0, len(pending), PIPELINE):
            commands = [
                aioimaplib.Command(
                    "STORE",
                    protocol.new_tag(),
                    filing.uid_set(uids),
                    "+FLAGS.SILENT",
                    f"({' '.join(words)})",
                    prefix="UID",
                    untagged_resp_name=f"STORE-{start + i}",
                    loop=protocol.loop,
                )
                for i, (uids, words) in enumerate(pending[start : start + PIPELINE])
            ]
            responses = await self._guard(
                asyncio.gather(*(protocol.execute(c) for c in commands)), "UID STORE"
            )
            for response in responses:
                if response.result != "OK":
                    raise ImapError(f"UID STORE: {response.result} {_text(response)}")

    async def move(self, uids: list[int], folder: str) -> None:
        """UID MOVE when the server has it; else COPY, \\Deleted, UID EXPUNGE.

        Without MOVE a connection cut between COPY and the expunge leaves a
        copy behind: the next attempt skips messages already flagged deleted.
        """
        assert self.imap is not None
        target = filing.quote(folder)
        uids_text = filing.uid_set(uids)
        if self.has("MOVE"):
            await self._ok(self.imap.uid("move", uids_text, target), "UID MOVE")
            return
        # Only those not copied yet: a copy already made carries \\Deleted here.
        undeleted = await self._ok(
            self.imap.protocol.search(f"UID {uids_text} UNDELETED", by_uid=True, charset=None),
            "UID SEARCH",
        )
        fresh = filing.search_uids(undeleted.lines, 0)
        if fresh:
            await self._ok(self.imap.uid("copy", filing.uid_set(fresh), target), "UID COPY")
        await self._ok(
            self.imap.uid("store", uids_text, "+FLAGS.SILENT", r"(\Deleted)"), "UID STORE"
        )
        if self.has("UIDPLUS"):
            await self._ok(self.imap.uid("expunge", uids_text), "UID EXPUNGE")
        else:
            await self._ok(self.imap.expunge(), "EXPUNGE")

    async def append(self, raw: bytes, folder: str) -> None:
        assert self.imap is not None
        await self._ok(
            self.imap.append(raw, mailbox=filing.quote(folder)),
            "APPEND",
            self._transfer_timeout(len(raw)),
        )

    async def noop(self) -> None:
        assert self.imap is not None
        await self._ok(self.imap.noop(), "NOOP")

    # -- waiting ----------------------------------------------------------------

    async def idle(self, seconds: float) -> bool:
        """IDLE for at most ``seconds`` (kept under the 29-minute limit by the
        caller); True when the server announced new mail."""
        assert self.imap is not None
        imap = self.imap
        # aioimaplib's own stop comes later than ours: ours ends the wait.
        idle = await self._guard(imap.idle_start(timeout=seconds + 5), "IDLE")
        woke = False
        try:
            async with asyncio.timeout(seconds):  # the loop's timer: no clock read here
                while not woke:
                    push = await self._guard(
                        imap.wait_server_push(timeout=seconds + 5), "IDLE", timeout=seconds + 10
                    )
                    if push == aioimaplib.STOP_WAIT_SERVER_PUSH:
                        break
                    woke = filing.wakes(push)
        except TimeoutError:
            pass  # nothing new for ``seconds``
        finally:
            if not self.lost.done() and imap.has_pending_idle():
                imap.idle_done()
        await self._guard(idle, "IDLE DONE")
        queue = imap.protocol.idle_queue
        while not queue.empty():
            woke = filing.wakes(queue.get_nowait()) or woke
        return woke
