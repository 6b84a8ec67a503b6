"""Statistics and output: medians, percentiles, ratios, tables, the JSON report.

Every scenario returns a ``Report``: tables (rendered as Markdown, so they can be
pasted into BENCHMARKS.md), the parameters, the machine, every raw run, and the
problems found. A report with problems makes ``python -m bench`` exit 1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import platform
import sqlite3
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def percentile(values: Sequence[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default), p in 0..100."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base


def fmt(value: Any, spec: str = ".2f", unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return format(value, spec) + unit


def spread(values: Sequence[float], spec: str = ".0f") -> str:
    if not values:
        return "–"
    return f"{format(min(values), spec)}–{format(max(values), spec)}"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""

    def add(self, *cells: Any) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            padded = [cells[0].ljust(widths[0])]
            padded += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            return "| " + " | ".join(padded) + " |"

        rule = (
            "|"
            + "|".join(
                "-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
            )
            + "|"
        )
        out = [f"**{self.title}**", "", line(self.columns), rule]
        out += [line(r) for r in self.rows]
        if self.note:
            out += ["", self.note]
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns, "rows": self.rows, "note": self.note}


@dataclass
class Report:
    scenario: str
    params: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)  # the headline numbers
    runs: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self, title: str, columns: list[str], note: str = "") -> Table:
        t = Table(title, columns, note=note)
        self.tables.append(t)
        return t

    def text(self) -> str:
        parts = [f"## {self.scenario}", ""]
        if self.params:
            parts += ["params: " + ", ".join(f"{k}={v}" for k, v in self.params.items()), ""]
        for t in self.tables:
            parts += [t.markdown(), ""]
        parts += [f"- {n}" for n in self.notes]
        if self.problems:
            parts += ["", "PROBLEMS (the run did not complete correctly):"]
            parts += [f"- {p}" for p in self.problems]
        parts += ["", f"{'ok' if self.ok else 'FAILED'} in {self.seconds:.0f}s"]
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "ok": self.ok,
            "seconds": round(self.seconds, 1),
            "params": self.params,
            "results": self.results,
            "tables": [t.as_dict() for t in self.tables],
            "problems": self.problems,
            "notes": self.notes,
            "runs": self.runs,
        }


def machine() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        facts["loadavg"] = os.getloadavg()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        for package in ("iqmaild", "aiosmtpd", "SQLAlchemy", "aiosqlite", "asyncpg"):
            with contextlib.suppress(Exception):
                facts[package] = version(package)
    with contextlib.suppress(Exception):
        facts.update(daemon_source())
    return facts


def daemon_source() -> dict[str, Any]:
    """Where the measured ``iqmaild`` was installed from (pip's direct_url.json), and for a
    git checkout the last commit that changed the daemon (+dirty if its files differ)."""
    import json
    from importlib.metadata import distribution
    from urllib.parse import urlparse

    info = json.loads(distribution("iqmaild").read_text("direct_url.json") or "{}")
    url = info.get("url", "")
    out: dict[str, Any] = {
        "iqmaild_from": url + (" (editable)" if info.get("dir_info", {}).get("editable") else "")
    }
    where = urlparse(url).path if url.startswith("file://") else ""
    if not where or not (Path(where) / ".git").exists():
        return out
    git = ["git", "-C", where]
    daemon_paths = ["--", "iqmaild", "migrations", "templates"]

    def run(*args: str) -> str:
        done = subprocess.run([*git, *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    dirty = run("status", "--porcelain", "--untracked-files=no", *daemon_paths)
    out["iqmaild_commit"] = run("log", "-1", "--format=%h", *daemon_paths) + (
        "+dirty" if dirty else ""
    )
    out["tree_head"] = run("rev-parse", "--short", "HEAD")
    return out
