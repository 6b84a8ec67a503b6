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
from iqmaild.service import STATUS_FD_VAR, build, classify_loop, reload_parts, worker_report


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
    # A HUP sent to the whole unit must not end us: the daemon re-reads the config
    # file and hands it over on stdin (we have no file of our own to re-read).
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("worker.sighup_ignored"))
    tasks = [
        asyncio.create_task(
            classify_loop(
                classifier, outbox.notify, log, parts.clock, config.processing.poll_seconds
            ),
            name="classify",
        ),
        asyncio.create_task(outbox.run(), name="outbox"),
    ]

    def reload(line: bytes) -> None:
        try:
            new = Config.model_validate_json(line)
        except ValueError as exc:  # the daemon validated it: only a bug lands here
            log.error("worker.reload_failed", error=str(exc)[:300])
            return
        log.info("worker.reloaded", reloaded=reload_parts(parts, new))

    async def wake_ups() -> None:
        buffer = b""
        while chunk := await reader.read(65536):
            buffer += chunk
            while buffer:
                if buffer.startswith(b"C"):  # C{config json}\n: a reload (SIGHUP)
                    line, newline, rest = buffer[1:].partition(b"\n")
                    if not newline:
                        break  # the rest of the line is still on its way
                    buffer = rest
                    reload(line)
                    continue
                wakes = len(buffer) - len(buffer.lstrip(b"w"))
                buffer = buffer[wakes or 1 :]  # w: intake committed (unknown bytes skipped)
                classifier.notify()
                outbox.notify()
        done.set()  # stdin closed: the daemon is gone or stopping

    async def report() -> None:
        """Metrics and stage state to the daemon, once a second (it renders /metrics)."""
        fd = os.environ.get(STATUS_FD_VAR, "")
        if not fd.isdigit():
            return
        pipe = os.fdopen(int(fd), "wb", buffering=0)
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, pipe)
        try:
            while True:
                if transport.is_closing():
                    return  # the daemon is gone
                if transport.get_write_buffer_size() < 1 << 20:  # never pile up unread
                    transport.write(worker_report(outbox, classifier, parts.metrics))
                await asyncio.sleep(1.0)
        finally:
            if not transport.is_closing():
                transport.write(worker_report(outbox, classifier, parts.metrics))
            transport.close()

    listener = asyncio.create_task(wake_ups(), name="wake-ups")
    reporter = asyncio.create_task(report(), name="report")
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
    reporter.cancel()  # its last report carries the final counts
    await asyncio.wait([reporter], timeout=5)
    await parts.db.dispose()
    log.info("worker.stopped")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
