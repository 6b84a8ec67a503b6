"""HTTP: the authorization link page, health, metrics, the Customer Panel API.

``GET /authorize/{token}`` only shows a page (mail scanners pre-fetch links);
only ``POST`` authorizes. Pages are Jinja2 with autoescape; attempts on the
link endpoints are rate-limited per client address.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from iqmaild.apply.links import LinkInfo, Links, LinkState
from iqmaild.clock import Clock
from iqmaild.config import Config
from iqmaild.metrics import MESSAGE_STATES, OUTBOX_STATES, Metrics
from iqmaild.rendering import Renderer
from iqmaild.storage.db import Database
from iqmaild.storage.models import Message, OutboxItem
from iqmaild.web import panel

PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex, nofollow",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
}
STATUS = {
    LinkState.NOT_FOUND: 404,
    LinkState.USED: 410,
    LinkState.EXPIRED: 410,
    LinkState.REVOKED: 410,
}


class SlidingLimiter:
    """At most ``limit`` attempts per key in any 60-second window."""

    def __init__(
        self, clock: Clock, limit: int, window: float = 60.0, max_keys: int = 100_000
    ) -> None:
        self.clock = clock
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.hits: dict[str, collections.deque[float]] = {}

    def full(self, key: str) -> bool:
        """No room for another attempt now (old attempts expire first)."""
        now = self.clock.monotonic()
        if len(self.hits) > self.max_keys:
            self.hits.clear()
        queue = self.hits.setdefault(key, collections.deque())
        while queue and queue[0] <= now - self.window:
            queue.popleft()
        return len(queue) >= self.limit

    def hit(self, key: str) -> None:
        self.hits.setdefault(key, collections.deque()).append(self.clock.monotonic())

    def allow(self, key: str) -> bool:
        if self.full(key):
            return False
        self.hit(key)
        return True


class WebApp:
    def __init__(
        self,
        config: Config,
        db: Database,
        renderer: Renderer,
        links: Links,
        submit: panel.Submit,
        *,
        log: Any,
        metrics: Metrics,
        clock: Clock,
        problems: Callable[[], Awaitable[list[str]]] | None = None,
        queued: Callable[[], None] = lambda: None,
        health: Callable[[], Awaitable[tuple[list[str], dict[str, Any]]]] | None = None,
        gauges: Callable[[], Awaitable[None]] | None = None,
    ):
        self.config = config
        self.db = db
        self.renderer = renderer
        self.links = links
        self.submit = submit
        self.log = log
        self.stats = metrics  # (self.metrics is the /metrics handler)
        self.problems = problems
        self.health = health  # the daemon's checks, each with its threshold
        self.gauges = gauges  # the daemon's queue gauges, computed at scrape time
        http = config.http
        self.limiter = SlidingLimiter(clock, http.authorize_attempts_per_minute)
        self.panel_failures = SlidingLimiter(clock, http.panel_failures_per_minute)
        self.queued = queued  # wakes the outbox: a click queues the acknowledgement
        public = [
            web.get("/authorize/{token}", self.authorize_page),
            web.post("/authorize/{token}", self.authorize_confirm),
        ]
        admin = [
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.metrics),
            web.post("/api/v1/tickets", self.panel_ticket),
        ]
        # With http.admin_listen the public listener serves the link page alone.
        self.app = web.Application(client_max_size=2 * 1024 * 1024)
        self.admin_app: web.Application | None = None
        if http.admin_listen:
            self.app.add_routes(public)
            self.admin_app = web.Application(client_max_size=2 * 1024 * 1024)
            self.admin_app.add_routes(admin)
        else:
            self.app.add_routes(public + admin)

    def _page(self, lang: str, name: str, status: int = 200, **ctx: Any) -> web.Response:
        body = self.renderer.render_page(lang, name, **ctx)
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            charset="utf-8",
            headers=PAGE_HEADERS,
        )

    def _client(self, request: web.Request) -> str:
        """The client address; behind a trusted proxy, the hop the proxy saw."""
        remote = request.remote or "unknown"
        if remote in self.config.http.trusted_proxies:
            hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
            if hops and hops[-1]:
                return hops[-1][:64]
        return remote

    def _limited(self, request: web.Request) -> web.Response | None:
        if self.limiter.allow(self._client(request)):
            return None
        self.stats.inc("authorize_rate_limited_total")
        return self._page(self.config.notices.default_lang, "error", 429, kind="rate_limited")

    async def authorize_page(self, request: web.Request) -> web.Response:
        limited = self._limited(request)
        if limited is not None:
            return limited
        token = request.match_info["token"]
        return await self._link(
            token,
            self.links.inspect(token),
            "authorize",
            action_url=token,  # relative: right also behind a path prefix
        )

    async def authorize_confirm(self, request: web.Request) -> web.Response:
        limited = self._limited(request)
        if limited is not None:
            return limited
        token = request.match_info["token"]
        response = await self._link(token, self.links.confirm(token), "confirmed")
        self.queued()
        return response

    async def _link(
        self, token: str, lookup: Awaitable[LinkInfo], page: str, **ctx: Any
    ) -> web.Response:
        """The page for a link: ``page`` when valid, else a clear 404/410/503 page."""
        try:
            info = await lookup
        except Exception as exc:
            self.log.error("http.error", path="/authorize", error=type(exc).__name__)
            return self._page(self.config.notices.default_lang, "error", 503, kind="unavailable")
        shown = {
            "ticket_number": info.ticket_number,
            "subject": info.subject,
            "sender": info.sender,
            "account": info.account,
            "service": info.service,
            "preview": info.preview,
            "authorized": info.authorized,
        }
        if info.state is not LinkState.VALID:
            return self._page(
                info.lang, "error", STATUS[info.state], kind=info.state.value, **shown
            )
        return self._page(info.lang, page, **shown, **ctx)

    async def healthz(self, request: web.Request) -> web.Response:
        """200 or 503; ``status`` names every problem, ``checks`` each check's figures."""
        checks: dict[str, Any] = {}
        if self.health is not None:
            problems, checks = await self.health()
        else:
            problems = [] if await self.db.ping() else ["database unavailable"]
            if self.problems is not None:
                problems += await self.problems()
        ok = not problems
        body: dict[str, Any] = {"status": "ok" if ok else "; ".join(problems)}
        if checks:
            body["checks"] = checks
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            await self._queue_gauges()
            if self.gauges is not None:
                await self.gauges()
        except Exception as exc:  # metrics must answer even when the database does not
            self.log.warning("metrics.gauges_failed", error=type(exc).__name__)
        return web.Response(
            text=self.stats.render(),
            content_type="text/plain",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    async def _queue_gauges(self) -> None:
        """Backlogs an operator alerts on: dead letters, failed and queued mail."""
        async with self.db.read() as session:
            messages = await session.execute(
                select(Message.state, func.count()).group_by(Message.state)
            )
            outbox = await session.execute(
                select(OutboxItem.state, func.count()).group_by(OutboxItem.state)
            )
        for state in MESSAGE_STATES:  # a state that emptied reads 0, not its last count
            self.stats.set("messages", 0, state=state)
        for state in OUTBOX_STATES:
            self.stats.set("outbox", 0, state=state)
        for state, count in messages:
            self.stats.set("messages", count, state=state)
        for state, count in outbox:
            self.stats.set("outbox", count, state=state)

    async def panel_ticket(self, request: web.Request) -> web.Response:
        client = self._client(request)
        if self.panel_failures.full(client):  # checked before the token is compared
            self.stats.inc("panel_rate_limited_total")
            return web.json_response({"error": "too many failed attempts"}, status=429)
        if not self._panel_credential_ok(request.headers.get("Authorization", "")):
            self.panel_failures.hit(client)
            self.log.warning("panel.unauthorized", client=client)
            return web.json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        response = await panel.create_ticket(request, self.db, self.submit, self.log)
        self.queued()
        return response

    def _panel_credential_ok(self, supplied: str) -> bool:
        """Constant-time; bytes from the wire compare as bytes (never an encoding error)."""
        expected = self.config.http.panel_token
        scheme, _, credential = supplied.partition(" ")
        if not expected or scheme.lower() != "bearer":
            return False
        presented = credential.strip().encode("utf-8", "surrogateescape")
        return hmac.compare_digest(presented, expected.encode())


class _Capped(asyncio.Protocol):
    """A connection beyond the cap gets a bare 503 and is closed; others pass through."""

    def __init__(self, inner: Any, cap: _Cap) -> None:
        self.inner = inner
        self.cap = cap
        self.counted = False

    def connection_made(self, transport: Any) -> None:
        if self.cap.open >= self.cap.limit:
            transport.write(
                b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                b"Retry-After: 5\r\nContent-Length: 0\r\n\r\n"
            )
            transport.close()
            return
        self.cap.open += 1
        self.counted = True
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.counted:
            self.counted = False
            self.cap.open -= 1
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.counted:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.counted else None

    def pause_writing(self) -> None:
        if self.counted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.counted:
            self.inner.resume_writing()


@dataclass
class _Cap:
    limit: int
    open: int = 0


class HttpServer:
    """aiohttp's app on our own listening socket, with a cap on open connections."""

    def __init__(self, runner: web.AppRunner, server: asyncio.AbstractServer) -> None:
        self.runner = runner
        self.server = server

    async def cleanup(self) -> None:
        self.server.close()
        await self.runner.cleanup()


async def start_http(
    webapp: WebApp,
    host: str,
    port: int,
    max_connections: int = 500,
    app: web.Application | None = None,
) -> tuple[HttpServer, int]:
    """Serve ``app`` (default: the public one) on host:port."""
    runner = web.AppRunner(app or webapp.app, access_log=None, handle_signals=False)
    await runner.setup()
    handler = runner.server
    assert handler is not None
    cap = _Cap(max_connections)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Capped(handler(), cap), host=host, port=port)
    bound = server.sockets[0].getsockname()[1]
    return HttpServer(runner, server), bound
