"""JSON logs: one object per line on stdout, keys ``ts``, ``level``, ``event``.

journald keeps stdout; operators grep events by name. Message bodies never
go to the log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_METHODS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40}
# The level in force; a processor reads it, so a reload (SIGHUP) changes it also
# for loggers that were bound before.
_level = [logging.INFO]


def set_level(level: str) -> None:
    _level[0] = LEVELS.get(level, logging.ERROR)


def _by_level(logger: Any, method: str, event: Any) -> Any:
    if _METHODS.get(method, 50) < _level[0]:
        raise structlog.DropEvent
    return event


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    set_level(level)
    structlog.configure(
        processors=[
            _by_level,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False, default=str),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        # One write per line (print() writes the newline apart): the daemon and its
        # worker share stdout, and their lines must not interleave.
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    # Libraries' own warnings (aiosmtpd, aiohttp, asyncio) become JSON lines too,
    # so `journalctl -o cat | jq` never meets a plain-text line.
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(_JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": "library.log",
            "logger": record.name,
            "message": record.getMessage()[:2000],
        }
        if record.exc_info and record.exc_info[0] is not None:
            data["exception"] = record.exc_info[0].__name__
        return json.dumps(data, ensure_ascii=False)


def get(name: str) -> Any:
    return structlog.get_logger(name).bind(logger=name)


class LoopErrors:
    """The event loop's exception handler: the same problem logs once per interval.

    Out of file descriptors, asyncio reports every failed accept(); a flood of
    connections would otherwise write millions of identical lines.
    """

    def __init__(self, log: Any, interval: float = 10.0) -> None:
        self.log = log
        self.interval = interval
        self.last: dict[str, tuple[float, int]] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        text = str(context.get("message", ""))[:200]
        key = f"{text}|{type(error).__name__ if error else ''}"
        now = loop.time()
        when, suppressed = self.last.get(key, (float("-inf"), 0))
        if now - when < self.interval:
            self.last[key] = (when, suppressed + 1)
            return
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = (now, 0)
        self.log.error(
            "loop.error",
            message=text,
            error=f"{type(error).__name__}: {error}"[:300] if error else None,
            repeated=suppressed,
        )
