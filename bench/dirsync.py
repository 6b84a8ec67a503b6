"""Directory sync at billing scale: `iqmaild directory import FILE --replace`.

``python -m bench.dirsync [--accounts 100000] [--backend sqlite|postgres|both]``

Each account has a primary, a technical and an additional address and two
services, each shared with one contact (3 addresses, 2 services, 2 shares per
account). Three imports, each a process of its own, timed and with its peak
RSS (the child's ru_maxrss): the first into an empty directory, the same file
again (nothing to change), and a file in which 1% of the accounts changed
(renamed, a new primary, a share moved), 1% are gone and 1% are new. Only the
``iqmaild`` command is driven; nothing here imports iqmaild.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.backends import PostgresBackend, postgres_available


def account(i: int, changed: bool = False) -> dict[str, Any]:
    domain = f"acct{i}.test"
    primary, technical = f"owner{i}@{domain}", f"tech{i}@{domain}"
    if changed:
        primary, technical = technical, primary  # a new primary, the old one kept as technical
    return {
        "id": f"acct{i:07d}",
        "primary": primary,
        "name": f"Firma {i} sp. z o.o." + (" (nowa nazwa)" if changed else ""),
        "lang": "en" if i % 10 == 9 else "pl",
        "technical": [technical],
        "additional": [f"biuro{i}@{domain}"],
        "services": [
            {"id": f"www{i}", "name": "WWW", "shared_with": [f"dev{i % 997}@agency.test"]},
            {
                "id": f"vps{i}",
                "name": "VPS",
                "shared_with": [f"ops{(i + changed) % 991}@partner.test"],
            },
        ],
    }


def write(path: Path, count: int, *, variant: bool) -> None:
    """Stream the file out (the generator must not be the memory hog)."""
    with path.open("w", encoding="utf-8") as out:
        out.write('{"accounts": [\n')
        first = True
        start, stop = (count // 100, count + count // 100) if variant else (0, count)
        for i in range(start, stop):
            changed = variant and i % 100 == 50
            out.write(("" if first else ",\n") + json.dumps(account(i, changed)))
            first = False
        out.write("\n]}\n")


def measured(cmd: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, CPU seconds (user + system), peak RSS in MiB of the child, and
    its last line of output. On a shared machine the CPU time is the figure that
    does not depend on the neighbours; the wall time is what an operator waits."""
    probe = (
        "import resource, subprocess, sys, time;"
        "t = time.perf_counter();"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
        "w = time.perf_counter() - t;"
        "sys.stderr.write(r.stderr);"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN);"
        "print(w, u.ru_maxrss, r.returncode, u.ru_utime + u.ru_stime);"
        "print(r.stdout.strip().splitlines()[-1] if r.stdout.strip() else '')"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=False
    )
    first, _, last = done.stdout.partition("\n")
    wall, rss, code, cpu = first.split()
    if code != "0":
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
    return float(wall), float(cpu), int(rss) // 1024, last.strip()


def config(path: Path, url: str) -> None:
    path.write_text(
        f"""[database]
url = "{url}"
[smtp]
desk_addresses = ["bok@desk.test"]
[http]
public_url = "http://127.0.0.1:1"
[outbound]
from = "BOK <bok@desk.test>"
staff_address = "staff@desk.test"
[security]
secret_key = "bench-dirsync-secret-key-0123456789abcdef"
""",
        encoding="utf-8",
    )


def run(backend: str, count: int, work: Path) -> list[dict[str, Any]]:
    pg = None
    if backend == "sqlite":
        url = f"sqlite+aiosqlite:///{work / 'dirsync.db'}"
    else:
        pg = PostgresBackend.create()
        url = pg.url
    try:
        conf = work / f"{backend}.toml"
        config(conf, url)
        iq = [sys.executable, "-m", "iqmaild.cli", "--config", str(conf)]
        subprocess.run([*iq, "migrate"], check=True, capture_output=True)
        base, variant = work / "base.json", work / "variant.json"
        out = []
        for label, file in (("initial", base), ("unchanged", base), ("1% changed", variant)):
            cmd = [*iq, "directory", "import", str(file), "--replace", "--summary"]
            wall, cpu, rss, summary = measured(cmd)
            row = {"backend": backend, "import": label, "seconds": wall, "cpu_seconds": cpu}
            out.append({**row, "rss_mib": rss, "load": os.getloadavg()[0]})
            print(
                f"{backend:8} {label:11} {wall:6.1f} s wall {cpu:6.1f} s CPU {rss:5d} MiB  "
                f"load {os.getloadavg()[0]:4.1f}  {summary}",
                flush=True,
            )
        return out
    finally:
        if pg is not None:
            pg.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    if "postgres" in backends and (why := postgres_available()):
        print(f"postgres skipped: {why}", file=sys.stderr)
        backends.remove("postgres")
    with tempfile.TemporaryDirectory(prefix="iq-dirsync-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        write(work / "base.json", args.accounts, variant=False)
        write(work / "variant.json", args.accounts, variant=True)
        size = os.path.getsize(work / "base.json") / 2**20
        print(
            f"{args.accounts} accounts, {size:.0f} MiB of JSON, "
            f"written in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
        results = [r for b in backends for r in run(b, args.accounts, work)]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
