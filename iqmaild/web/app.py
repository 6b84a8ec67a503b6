"""HTTP: the authorization link page, health, metrics, the Customer Panel API.

``GET /authorize/{token}`` only shows a page (mail scanners pre-fetch links);
only ``POST`` authorizes. Pages are Jinja2 with autoescape; attempts on the
link endpoints are rate-limited per client address.
"""

from __future__ import annotations

import collections
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from sqlalchemy import func, select

from iqmaild.ingest.store import Incoming
from iqmaild.process import confirm
from iqmaild.process.confirm import LinkInfo, LinkState
from iqmaild.process.desk import Desk
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
STATUS = {LinkState.NOT_FOUND: 404, LinkState.USED: 410, LinkState.EXPIRED: 410}


class SlidingLimiter:
    """At most ``limit`` attempts per key in any 60-second window."""

    def __init__(self, limit: int, window: float = 60.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.hits: dict[str, collections.deque[float]] = {}

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        if len(self.hits) > self.max_keys:
            self.hits.clear()
        queue = self.hits.setdefault(key, collections.deque())
        while queue and queue[0] <= now - self.window:
            queue.popleft()
        if len(queue) >= self.limit:
            return False
        queue.append(now)
        return True


class WebApp:
    def __init__(
        self,
        db: Database,
        desk: Desk,
        intake: Callable[[Incoming], Awaitable[int]],
        problems: Callable[[], list[str]] = list,
    ):
        self.problems = problems
        self.db = db
        self.desk = desk
        self.limiter = SlidingLimiter(desk.config.http.authorize_attempts_per_minute)
        self.intake = intake
        self.app = web.Application(client_max_size=2 * 1024 * 1024)
        self.app.add_routes(
            [
                web.get("/authorize/{token}", self.authorize_page),
                web.post("/authorize/{token}", self.authorize_confirm),
                web.get("/healthz", self.healthz),
                web.get("/metrics", self.metrics),
                web.post("/api/v1/tickets", self.panel_ticket),
            ]
        )

    def _page(self, lang: str, name: str, status: int = 200, **ctx: Any) -> web.Response:
        body = self.desk.renderer.render_page(lang, name, **ctx)
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
        if remote in self.desk.config.http.trusted_proxies:
            hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
            if hops and hops[-1]:
                return hops[-1][:64]
        return remote

    def _limited(self, request: web.Request) -> web.Response | None:
        if self.limiter.allow(self._client(request)):
            return None
        self.desk.metrics.inc("authorize_rate_limited_total")
        return self._page(self.desk.config.notices.default_lang, "error", 429, kind="rate_limited")

    async def authorize_page(self, request: web.Request) -> web.Response:
        limited = self._limited(request)
        if limited is not None:
            return limited
        token = request.match_info["token"]
        return await self._link(
            token,
            confirm.inspect(self.db, token),
            "authorize",
            action_url=token,  # relative: right also behind a path prefix
        )

    async def authorize_confirm(self, request: web.Request) -> web.Response:
        limited = self._limited(request)
        if limited is not None:
            return limited
        token = request.match_info["token"]
        return await self._link(token, confirm.confirm(self.db, self.desk, token), "confirmed")

    async def _link(
        self, token: str, lookup: Awaitable[LinkInfo], page: str, **ctx: Any
    ) -> web.Response:
        """The page for a link: ``page`` when valid, else a clear 404/410/503 page."""
        try:
            info = await lookup
        except Exception as exc:
            self.desk.log.error("http.error", path="/authorize", error=type(exc).__name__)
            return self._page(
                self.desk.config.notices.default_lang, "error", 503, kind="unavailable"
            )
        if info.state is not LinkState.VALID:
            return self._page(info.lang, "error", STATUS[info.state], kind=info.state.value)
        extra = {"sender": info.sender} if page == "authorize" else {}
        return self._page(
            info.lang, page, ticket_number=info.ticket_number, subject=info.subject, **extra, **ctx
        )

    async def healthz(self, request: web.Request) -> web.Response:
        problems = [] if await self.db.ping() else ["database unavailable"]
        problems += self.problems()
        ok = not problems
        return web.json_response(
            {"status": "ok" if ok else "; ".join(problems)}, status=200 if ok else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            await self._queue_gauges()
        except Exception as exc:  # metrics must answer even when the database does not
            self.desk.log.warning("metrics.gauges_failed", error=type(exc).__name__)
        return web.Response(
            text=self.desk.metrics.render(), content_type="text/plain", charset="utf-8"
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
        for state, count in messages:
            self.desk.metrics.set(f'messages{{state="{state}"}}', count)
        for state, count in outbox:
            self.desk.metrics.set(f'outbox{{state="{state}"}}', count)

    async def panel_ticket(self, request: web.Request) -> web.Response:
        expected = self.desk.config.http.panel_token
        supplied = request.headers.get("Authorization", "")
        scheme, _, credential = supplied.partition(" ")
        if (
            not expected
            or scheme.lower() != "bearer"
            or not hmac.compare_digest(credential.strip().encode(), expected.encode())
        ):
            return web.json_response(
                {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return await panel.create_ticket(request, self.db, self.desk, self.intake)


async def start_http(webapp: WebApp, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(webapp.app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server  # aiohttp exposes the bound port only here
    bound = server.sockets[0].getsockname()[1] if server and server.sockets else port
    return runner, bound
