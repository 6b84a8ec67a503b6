"""/metrics through prometheus_client (issue 8, item 5): HELP and TYPE for every
family, every series from the start, queue depth and age by kind, stage
latencies, and the worker process's counts in the daemon's answer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from iqmaild.metrics import COUNTERS, GAUGES, HISTOGRAMS, KINDS, SMTP_CODES, _combinations
from tests.conftest import harness_on
from tests.harness import Harness

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(h: Harness, port: int | None = None) -> tuple[str, Samples]:
    url = f"http://127.0.0.1:{port or h.daemon.http_port}/metrics"
    async with h.http.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):  # the official parser accepts it
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (f"iqmaild_{name}", tuple(sorted(labels.items())))


async def test_every_series_is_there_from_the_start_with_help_and_type(desk: Harness) -> None:
    text, samples = await scrape(desk)
    for name, (_, labels, values) in {**COUNTERS, **GAUGES}.items():
        assert f"# HELP iqmaild_{name} " in text, name
        assert f"# TYPE iqmaild_{name} " in text, name
        for combo in _combinations(values) if labels else [()]:
            assert key(name, **dict(zip(labels, combo, strict=True))) in samples, (name, combo)
    for name, (_, labels, values) in HISTOGRAMS.items():
        assert f"# TYPE iqmaild_{name} histogram" in text
        for combo in _combinations(values):
            count = key(f"{name}_count", **dict(zip(labels, combo, strict=True)))
            assert samples[count] == 0
    assert samples[key("message_reasons_total", decision="authorized", reason="unshared_cc")] == 0
    assert all(samples[key("smtp_replies_total", code=c)] == 0 for c in SMTP_CODES)
    assert samples[key("outbox_failed_total", kind="staff")] == 0
    assert samples[key("autoreplies_suppressed_total", why="bounced")] == 0
    assert samples[key("relay_last_success_seconds")] == -1
    assert "_created" not in text


async def test_decisions_replies_deliveries_and_stage_latencies_are_counted(
    desk: Harness,
) -> None:
    await desk.send()  # the primary address, a new request: pending, a link goes out
    await desk.drain()
    _, samples = await scrape(desk)
    assert samples[key("messages_classified_total", decision="pending")] == 1
    reasons = {
        labels: value
        for (name, labels), value in samples.items()
        if name == "iqmaild_message_reasons_total" and value
    }
    assert sum(reasons.values()) >= 1 and all(dict(k)["decision"] == "pending" for k in reasons)
    # EHLO (multi-line, once), MAIL, RCPT and the 250 after the commit; 354 for DATA.
    assert samples[key("smtp_replies_total", code="250")] == 4
    assert samples[key("smtp_replies_total", code="354")] == 1
    assert samples[key("outbox_sent_total", kind="auth_request")] == 1
    assert samples[key("outbox_sent_total", kind="staff")] == 1
    for stage, count in (("commit", 1), ("classify", 1), ("deliver", 2)):
        assert samples[key("stage_seconds_count", stage=stage)] == count, stage
    assert samples[key("relay_last_success_seconds")] >= 0


async def test_outbox_depth_and_oldest_age_by_kind(desk: Harness) -> None:
    await desk.relay.stop()
    await desk.send()
    await desk.drain()  # deferred: the relay is down
    desk.advance(90)
    _, samples = await scrape(desk)
    assert samples[key("outbox_depth", kind="auth_request")] == 1
    assert samples[key("outbox_depth", kind="staff")] == 1
    assert samples[key("outbox_oldest_seconds", kind="staff")] == 90
    assert samples[key("outbox_deferred_total", kind="staff")] == 1
    assert samples[key("relay_last_failure_seconds")] == 90
    assert all(samples[key("outbox_depth", kind=k)] == 0 for k in KINDS if k not in {
        "auth_request", "staff"})  # fmt: skip


async def test_the_worker_process_counts_reach_the_daemons_metrics(
    backend: str, tmp_path: Path
) -> None:
    """Classification and delivery run in the worker: its counters are in /metrics."""
    async with harness_on(backend, tmp_path, background=True) as h:
        assert h.daemon.worker is not None
        await h.send()
        deadline = time.monotonic() + 60  # generous: a loaded machine, two processes
        while True:
            _, samples = await scrape(h)
            sent = samples[key("outbox_sent_total", kind="staff")]
            if sent == 1 and samples[key("outbox_sent_total", kind="auth_request")] == 1:
                break
            assert time.monotonic() < deadline, (
                f"the worker's counts never arrived: {sent}, {h.daemon.worker.status.keys()}, "
                f"{[m.rcpt_tos for m in h.relay.messages]}"
            )
            await asyncio.sleep(0.2)
        assert samples[key("messages_classified_total", decision="pending")] == 1
        assert samples[key("stage_seconds_count", stage="deliver")] == 2
        assert samples[key("stage_seconds_count", stage="commit")] == 1  # the daemon's own
        assert samples[key("worker_up")] == 1
        assert samples[key("relay_last_success_seconds")] >= 0  # from the worker's report
        _, body = await _health(h)
        assert body["checks"]["relay"]["last_success_seconds_ago"] is not None
        assert body["checks"]["worker"] == {"ok": True, "restarts": 0}


async def _health(h: Harness, port: int | None = None) -> tuple[int, dict]:
    async with h.http.get(f"http://127.0.0.1:{port or h.daemon.http_port}/healthz") as resp:
        return resp.status, await resp.json()


async def test_admin_listen_keeps_health_metrics_and_the_api_off_the_public_listener(
    backend: str, tmp_path: Path
) -> None:
    async with harness_on(backend, tmp_path, http={"admin_listen": "127.0.0.1:0"}) as h:
        public, admin = h.daemon.http_port, h.daemon.admin_port
        assert admin and admin != public
        async with aiohttp.ClientSession() as http:
            for path in ("/metrics", "/healthz"):
                async with http.get(f"http://127.0.0.1:{public}{path}") as resp:
                    assert resp.status == 404, path
                async with http.get(f"http://127.0.0.1:{admin}{path}") as resp:
                    assert resp.status == 200, path
            async with http.post(f"http://127.0.0.1:{public}/api/v1/tickets", json={}) as resp:
                assert resp.status == 404
            async with http.post(f"http://127.0.0.1:{admin}/api/v1/tickets", json={}) as resp:
                assert resp.status == 401  # there, and asks for the panel's token
            async with http.get(f"http://127.0.0.1:{public}/authorize/nope") as resp:
                assert resp.status == 404 and resp.content_type == "text/html"  # the link page
            async with http.get(f"http://127.0.0.1:{admin}/authorize/nope") as resp:
                assert resp.status == 404 and resp.content_type == "text/plain"  # not there
        status, body = await _health(h, admin)
        assert status == 200 and body["checks"]["listeners"]["admin"] is True


async def _until(h: Harness, name: str, value: float, **labels: str) -> Samples:
    deadline = time.monotonic() + 60
    while True:
        _, samples = await scrape(h)
        if samples[key(name, **labels)] == value:
            return samples
        assert time.monotonic() < deadline, (name, labels, samples[key(name, **labels)])
        await asyncio.sleep(0.2)


async def test_a_restarted_worker_never_sends_counters_back(tmp_path: Path) -> None:
    import os
    import signal

    async with harness_on("sqlite", tmp_path, background=True) as h:
        worker = h.daemon.worker
        assert worker is not None and worker.proc is not None
        await h.send()
        await _until(h, "outbox_sent_total", 1, kind="staff")
        os.kill(worker.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while not (worker.restarts == 1 and worker.alive and worker.status):
            assert time.monotonic() < deadline, "the worker was not restarted"
            await asyncio.sleep(0.1)
        _, samples = await scrape(h)
        assert samples[key("outbox_sent_total", kind="staff")] == 1  # kept, not reset
        await h.send(subject="Po restarcie")
        await _until(h, "outbox_sent_total", 2, kind="staff")
