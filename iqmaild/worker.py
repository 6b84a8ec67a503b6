"""The worker process: classification, apply and delivery, on a core of their own.

Started by the daemon (`service.Supervisor`) with the validated config as the
first line of its stdin; every further byte there means "intake committed".
Between wake-ups it polls for due rows, so mail queued by the CLI or another
instance leaves within ``processing.poll_seconds``. When its stdin closes (the
daemon stops, or died) it finishes what is on the wire and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

from iqmaild import logs
from iqmaild.config import Config
from iqmaild.service import build, classify_loop


async def main() -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    first = await reader.readline()
    if not first:
        return 0
    config = Config.model_validate_json(first)
    with contextlib.suppress(OSError):  # intake first on the CPU too
        os.nice(config.processing.worker_nice)
    logs.configure(config.logging.level)
    log = logs.get("iqmaild.worker")
    parts = build(config, log)
    outbox = parts.outbox()
    classifier = parts.classifier(on_processed=outbox.notify)
    # SIGTERM from systemd reaches the whole unit: stop the way the daemon asks us to.
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    tasks = [
        asyncio.create_task(
            classify_loop(
                classifier, outbox.notify, log, parts.clock, config.processing.poll_seconds
            ),
            name="classify",
        ),
        asyncio.create_task(outbox.run(), name="outbox"),
    ]

    async def wake_ups() -> None:
        while chunk := await reader.read(4096):
            if chunk:
                classifier.notify()
                outbox.notify()
        done.set()  # stdin closed: the daemon is gone or stopping

    listener = asyncio.create_task(wake_ups(), name="wake-ups")
    log.info("worker.started", instance=parts.instance)
    await done.wait()
    listener.cancel()
    # Let the rows on the wire be marked sent, hand the rest of our claims back.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(outbox.delivering.acquire(), timeout=10)
    with contextlib.suppress(Exception):
        await outbox.release_claims()
    with contextlib.suppress(Exception):
        await classifier.release_claims()
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=10)
    await parts.db.dispose()
    log.info("worker.stopped")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
