"""``python -m bench <scenario> [--short] [--json] ...``; see bench/README.md."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import report
from bench.backends import postgres_available
from bench.proc import BenchError, MissingTool
from bench.scenarios import NOT_IN_ALL, SCENARIOS
from bench.scenarios.common import Settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of iqmaild through its outside interfaces (see bench/README.md).",
    )
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument(
        "--short",
        action="store_true",
        help="a tiny run (a few dozen messages, 1 repetition) for CI; no timing claims",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="the report as JSON on stdout (progress and tables go to stderr)",
    )
    p.add_argument("--repeat", type=int, help="repetitions; the median is reported")
    p.add_argument(
        "--backend",
        choices=["sqlite", "postgres", "both"],
        help="database back end (default: sqlite; 'all' runs ingest and e2e on both)",
    )
    p.add_argument("--messages", type=int, help="messages per run (scenario default)")
    p.add_argument("--sessions", type=int, help="parallel SMTP sessions (scenario default)")
    p.add_argument("--sizes", help="ingest: comma-separated message sizes in bytes")
    p.add_argument("--addresses", help="scale: comma-separated directory sizes")
    p.add_argument(
        "--mix",
        choices=["new", "mix"],
        action="append",
        help="e2e: run only this mix (repeatable; default both)",
    )
    p.add_argument(
        "--gc1", action="store_true", help="ingest: also iqmaild with smtp.group_commit_max = 1"
    )
    p.add_argument(
        "--load",
        choices=["client", "smtp-source"],
        help="ingest: the load generator (default: the asyncio client, which declares SIZE "
        "as Postfix does; smtp-source never does)",
    )
    p.add_argument("--log-level", default="info", help="the daemon's logging.level (info)")
    p.add_argument(
        "--idle-close",
        type=float,
        help="outbound.idle_close_seconds for the daemon (default: the daemon's; "
        "--short sets 0.5 so CI does not wait for an idle outbox)",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run py-spy on the daemon during the measured part, write to DIR",
    )
    p.add_argument("--keep", action="store_true", help="keep work directories of passing runs")
    p.add_argument("--out", type=Path, metavar="FILE", help="also write the JSON report to FILE")
    return p


def settings(args: argparse.Namespace, scenario: str) -> Settings:
    backend = args.backend
    if backend is None:
        backend = "both" if args.scenario == "all" and scenario in ("ingest", "e2e") else "sqlite"
    backends = ("sqlite", "postgres") if backend == "both" else (backend,)
    if "postgres" in backends:
        why = postgres_available()
        if why:
            if args.backend in ("postgres", "both"):
                raise MissingTool(why)
            backends = tuple(b for b in backends if b != "postgres")
            print(f"bench: {why}; SQLite only", file=sys.stderr)
    extra = {
        "messages": args.messages,
        "sessions": args.sessions,
        "mixes": args.mix,
        "gc1": args.gc1,
        "load": args.load,
    }
    if args.sizes:
        extra["sizes"] = [int(x) for x in args.sizes.split(",")]
    if args.addresses:
        extra["addresses"] = [int(float(x)) for x in args.addresses.split(",")]
    idle = args.idle_close if args.idle_close is not None else (0.5 if args.short else None)
    return Settings(
        short=args.short,
        repeat=args.repeat,
        backends=backends,
        keep=args.keep,
        log_level=args.log_level,
        idle_close=idle,
        profile_dir=args.profile,
        extra=extra,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = (
        [n for n in SCENARIOS if n not in NOT_IN_ALL] if args.scenario == "all" else [args.scenario]
    )
    out = sys.stderr if args.json else sys.stdout
    reports = []
    started = time.monotonic()
    try:
        for name in names:
            s = settings(args, name)
            t0 = time.monotonic()
            rep = SCENARIOS[name](s)
            rep.seconds = time.monotonic() - t0
            reports.append(rep)
            print(rep.text() + "\n", file=out, flush=True)
    except MissingTool as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    doc = {
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": report.machine(),
        "seconds": round(time.monotonic() - started, 1),
        "ok": all(r.ok for r in reports),
        "reports": [r.as_dict() for r in reports],
    }
    machine = doc["machine"]
    print(
        f"{machine['date']}; {machine['nproc']} CPUs, load {machine.get('loadavg')}; iqmaild "
        f"{machine.get('iqmaild_commit', '')} from {machine.get('iqmaild_from', '?')}",
        file=out,
    )
    text = json.dumps(doc, indent=1, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(text)
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
