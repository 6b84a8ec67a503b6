"""Every scenario in its short mode, as CI runs it: ``python -m bench X --short --json``.

These tests assert that each run completed correctly (every accepted message
stored and processed, every expected outbound mail captured by the relay, the
daemon stopped cleanly). They make no claim about speed: the numbers of a short
run on a shared CI machine mean nothing.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.bench


def _tools_missing() -> str | None:
    sys.path.insert(0, str(ROOT))
    from bench.proc import MissingTool, find_tool

    try:
        find_tool("smtp-sink")  # smtp-source only for --load smtp-source
    except MissingTool as exc:
        return str(exc)
    return None


def run_bench(*args: str, timeout: float = 120) -> dict[str, Any]:
    missing = _tools_missing()
    if missing:
        pytest.skip(missing)
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--short", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode == 2:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["ok"], doc
    (report,) = doc["reports"]
    assert report["ok"] and not report["problems"]
    return report


def daemon_runs(report: dict[str, Any]) -> list[dict[str, Any]]:
    runs = [r for r in report["runs"] if "daemon_exit" in r["checks"]]
    assert runs, "no daemon run"
    for r in runs:
        assert r["problems"] == []
        assert r["checks"]["daemon_exit"]["status"] == 0
        assert r["checks"]["daemon_exit"]["error_lines"] == 0
    return runs


def assert_all_processed_and_sent(run: dict[str, Any], accepted: int) -> None:
    assert run["checks"]["message_states"] == {"processed": accepted}
    states = run["checks"]["outbox_states"]
    assert set(states) == {"sent"}, states


def test_ingest() -> None:
    report = run_bench("ingest")
    runs = daemon_runs(report)
    assert len(runs) == 3  # 2 KB, 10 KB, 1 MB
    for r in runs:
        assert r["checks"]["stored"] == r["values"]["messages"] > 0
    sizes = {t["title"] for t in report["tables"]}
    assert len(sizes) == 3


def test_e2e() -> None:
    report = run_bench("e2e")
    runs = {r["label"]: r for r in daemon_runs(report)}
    new, mix = runs["new-iqmaild-sqlite-r1"], runs["mix-iqmaild-sqlite-r1"]
    n = new["values"]["messages"]
    assert new["checks"]["relay_counts"] == {"staff": n, "auth_request": n}
    assert_all_processed_and_sent(new, n)
    kinds = mix["checks"]["kinds"]
    assert set(kinds) == {"new", "tagged", "threadref", "unknown"}
    counts = mix["checks"]["relay_counts"]
    assert counts["staff"] == n
    assert counts["auth_request"] == kinds["new"]
    # notices to unknown senders may be capped (anti-backscatter); all others are required
    assert kinds["threadref"] <= counts["notice"] <= kinds["threadref"] + kinds["unknown"]
    sent, at_most = mix["checks"]["unknown_sender_notices"]
    assert at_most == kinds["unknown"] and sent == counts["notice"] - kinds["threadref"]
    assert mix["checks"]["message_states"]["processed"] > n  # plus the setup's tickets
    assert mix["checks"]["ticket_show"]["authorization"] == "authorized"  # ticket show --json
    assert report["results"]["new_sqlite_vs_aiosmtpd"] > 0


def test_burst() -> None:
    report = run_bench("burst")
    (run,) = daemon_runs(report)
    n = report["params"]["messages"]
    assert_all_processed_and_sent(run, n)
    curve = run["values"]["curve"]
    assert run["values"]["curve_columns"] == [
        "t", "received", "classified", "auth_at_relay", "staff_at_relay",
    ]  # fmt: skip
    assert curve[-1][1:] == [n, n, n, n]
    for earlier, later in itertools.pairwise(curve):
        assert all(a <= b for a, b in zip(earlier[1:], later[1:], strict=True))


def test_latency() -> None:
    report = run_bench("latency")
    (run,) = [r for r in daemon_runs(report)]
    v = run["values"]
    assert len(v["auth_latency"]) == v["paced_messages"]
    assert len(v["ack_latency"]) == report["params"]["clicks"]
    assert_all_processed_and_sent(run, run["checks"]["accepted"])


def test_scale() -> None:
    report = run_bench("scale")
    runs = daemon_runs(report)
    assert len(runs) == 2
    for r in runs:
        assert_all_processed_and_sent(r, r["checks"]["accepted"])


def test_soak() -> None:
    report = run_bench("soak")
    (run,) = daemon_runs(report)
    chunks = run["values"]["chunks"]
    assert [c["processed"] for c in chunks] == [20, 40, 60]
    assert all(c["tree_kib"] > c["main_kib"] > 0 for c in chunks)  # the worker counted too
    assert report["results"]["sqlite_rss_growth"] is not None


@pytest.mark.postgres
def test_postgres_mix() -> None:
    """The PostgreSQL path (throwaway database, template copies, drop) once: the mix,
    which also opens tickets, clicks links and sends follow-ups."""
    report = run_bench("e2e", "--backend", "postgres", "--mix", "mix")
    (run,) = daemon_runs(report)
    assert run["checks"]["relay_counts"]["staff"] == run["values"]["messages"]
    assert_all_processed_and_sent(run, run["checks"]["message_states"]["processed"])
