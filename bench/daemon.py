"""``iqmaild serve`` as a subprocess, with its own config, database, CLI and log.

Only the daemon's stable interfaces are used: the ``iqmaild`` command
(``migrate``, ``directory import``, ``serve``, ``message list --json``,
``outbox list --json``, ``ticket show N --json``), the config keys documented in
``config.example.toml``, ``GET /healthz`` and ``POST /authorize/{token}``, and
its JSON log lines on stdout (``ts``, ``level``, ``event``).

A scenario calls ``prepare`` once per back end (migrate + directory into a
template database) and starts every run on a fresh copy::

    template = prepare(workdir, "sqlite", accounts=2000)
    with Daemon(run_dir, template.clone(run_dir), relay.port) as d:
        ...  # d.smtp_port, d.click(token), d.messages(), d.cpu_seconds()
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import directory, proc
from bench.backends import Backend, new_backend
from bench.proc import BenchError

DESK = "bok@desk.test"
STAFF = "staff@desk.test"
TAG_PREFIX = "IQ.pl"
NUMBER_START = 1000
ROOT = Path(__file__).resolve().parent.parent


def iqmaild_command() -> list[str]:
    """The installed console script, preferably next to this Python."""
    beside = Path(sys.executable).with_name("iqmaild")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("iqmaild")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from iqmaild.cli import main; sys.exit(main())"]


@dataclass
class Options:
    """What a scenario may vary; everything else is the shipped default."""

    log_level: str = "info"  # the shipped default; the burst curve reads classified events
    group_commit_max: int | None = None  # None: the daemon's default
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


def config(db_url: str, smtp: int, http_port: int, relay: int, options: Options) -> dict[str, Any]:
    data: dict[str, dict[str, Any]] = {
        "database": {"url": db_url},
        "smtp": {
            "listen": f"{proc.HOST}:{smtp}",
            "desk_addresses": [DESK],
            "hostname": "desk.test",
        },
        "http": {
            "listen": f"{proc.HOST}:{http_port}",
            "public_url": f"http://{proc.HOST}:{http_port}",
            # every click of a benchmark comes from 127.0.0.1: lift the per-client limit
            "authorize_attempts_per_minute": 1_000_000,
        },
        "outbound": {
            "relay": f"{proc.HOST}:{relay}",
            "from": f"Biuro Obsługi Klienta <{DESK}>",
            "staff_address": STAFF,
        },
        "tickets": {"tag_prefix": TAG_PREFIX, "number_start": NUMBER_START},
        "security": {"secret_key": "bench-secret-key-0123456789abcdef-0123456789"},
        "logging": {"level": options.log_level},
    }
    if options.group_commit_max is not None:
        data["smtp"]["group_commit_max"] = options.group_commit_max
    for section, values in options.overrides.items():
        data.setdefault(section, {}).update(values)
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = []
        for key, value in values.items():
            if isinstance(value, dict):
                nested.append((f"{name}.{key}", value))
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
        for sub, sub_values in nested:
            table(sub, sub_values)

    for name, values in data.items():
        table(name, values)
    return "\n".join(lines)


class Cli:
    """``iqmaild --config FILE ...`` for one database."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def __call__(self, *args: str, timeout: float = 600) -> str:
        cmd = [*iqmaild_command(), "--config", str(self.config_path), *args]
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, env=self.env)
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-500:]
            raise BenchError(f"iqmaild {' '.join(args[:2])} failed ({done.returncode}): {err}")
        return done.stdout.decode(errors="replace")

    def json(self, *args: str, timeout: float = 600) -> Any:
        return json.loads(self(*args, "--json", timeout=timeout))

    def messages(self) -> list[dict[str, Any]]:
        return list(self.json("message", "list", "--limit", "100000000"))

    def outbox(self) -> list[dict[str, Any]]:
        return list(self.json("outbox", "list", "--limit", "100000000"))

    def ticket(self, number: int) -> dict[str, Any]:
        return dict(self.json("ticket", "show", str(number)))


def write_config(
    path: Path, db: Backend, smtp: int, http_port: int, relay: int, options: Options
) -> Path:
    path.write_text(to_toml(config(db.url, smtp, http_port, relay, options)), encoding="utf-8")
    return path


def import_directory(db: Backend, workdir: Path, accounts: int) -> None:
    """``iqmaild directory import`` of ``accounts`` generated accounts."""
    cli = Cli(write_config(workdir / "import.toml", db, 1, 2, 3, Options()))
    path = workdir / "directory.json"
    path.write_text(json.dumps(directory.to_json(accounts)), encoding="utf-8")
    cli("directory", "import", str(path), timeout=3600)


def prepare(
    workdir: Path,
    backend: str,
    *,
    accounts: int = 0,
    bulk_accounts: int = 0,
) -> Backend:
    """A migrated template database: ``accounts`` generated accounts imported through
    ``iqmaild directory import``, then ``bulk_accounts`` more written by the bulk loader."""
    workdir.mkdir(parents=True, exist_ok=True)
    db = new_backend(backend, workdir)
    try:
        Cli(write_config(workdir / "prepare.toml", db, 1, 2, 3, Options()))("migrate")
        if accounts:
            import_directory(db, workdir, accounts)
        if bulk_accounts:
            directory.bulk_load(db, bulk_accounts, start=accounts)
    except BaseException:
        db.drop()
        raise
    return db


class Daemon:
    """One running ``iqmaild serve``; a context manager that stops it and checks the exit."""

    def __init__(self, workdir: Path, db: Backend, relay_port: int, options: Options) -> None:
        self.workdir = workdir
        self.db = db
        self.smtp_port, self.http_port = proc.free_ports(2)
        self.config_path = write_config(
            workdir / "iqmaild.toml", db, self.smtp_port, self.http_port, relay_port, options
        )
        self.cli = Cli(self.config_path)
        self.log_path = workdir / "serve.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.exit: dict[str, Any] = {}

    def start(self, timeout: float = 60) -> Daemon:
        log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                [*iqmaild_command(), "--config", str(self.config_path), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.cli.env,
            )
        finally:
            log.close()
        proc.wait_smtp(self.smtp_port, self.process, timeout)
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                status, body = self.http("GET", "/healthz")
                if status == 200:
                    return
                last = f"{status} {body[:100]!r}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise BenchError(f"/healthz not ok after {timeout:.0f}s: {last}")

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self, grace: float = 30.0) -> dict[str, Any]:
        """SIGTERM; records exit status, stop time and error lines of the log."""
        if self.process is None or self.exit:
            return self.exit
        status, seconds = proc.stop(self.process, grace)
        errors = [line for line in self.log_lines() if line.get("level") in ("error", "critical")]
        errors += [{"raw": raw} for raw in self._raw_lines() if raw.startswith("Traceback")]
        self.exit = {
            "status": status,
            "stop_seconds": round(seconds, 2),
            "error_lines": len(errors),
            "first_errors": errors[:3],
        }
        return self.exit

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU of the daemon and every process it runs (the rebuild may add workers)."""
        return proc.tree_cpu_seconds(self.pid)

    def _raw_lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self._raw_lines():
            with contextlib.suppress(ValueError):
                item = json.loads(raw)
                if isinstance(item, dict):
                    out.append(item)
        return out

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.log_lines() if e.get("event") == name]

    def http(self, method: str, path: str, timeout: float = 30) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(proc.HOST, self.http_port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            conn.request(method, path, body=b"" if method == "POST" else None, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def click(self, token: str) -> int:
        """What the customer's button does: ``POST /authorize/{token}``."""
        status, _ = self.http("POST", f"/authorize/{token}")
        return status


def log_time(event: dict[str, Any]) -> float | None:
    """The ``ts`` of a log line as ``time.time()`` seconds."""
    from datetime import datetime

    ts = event.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def check_stored(cli: Cli, expected_keys: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Every accepted message is a row (``message list``); none is a dead letter."""
    rows = cli.messages()
    problems = []
    if len(rows) != expected_keys:
        problems.append(f"LOST MAIL: {expected_keys} accepted, message list shows {len(rows)}")
    dead = [r for r in rows if r.get("state") == "dead"]
    if dead:
        problems.append(f"{len(dead)} dead letters, e.g. {dead[0].get('last_error', '')[:200]}")
    return rows, problems
