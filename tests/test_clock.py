"""One clock (issue 6, item 5): no module reads the time but iqmaild/clock.py.

Leases, retries, expiry, rate limits and suppressions then all move with the
clock the wiring hands out, and the tests move a FakeClock instead of sleeping.
The log's own timestamps and the event loop's exception throttle are the two
readings allowed elsewhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import iqmaild

PACKAGE = Path(iqmaild.__file__).parent
ALLOWED = {"clock.py", "logs.py"}
READINGS = {
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
    ("time", "time"),
    ("time", "monotonic"),
    ("time", "perf_counter"),
    ("time", "time_ns"),
}


def readings(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        if (name, node.func.attr) in READINGS or (node.func.attr == "time" and name == "loop"):
            out.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}.{node.func.attr}()")
    return out


def test_no_module_reads_the_clock_itself() -> None:
    found = [
        reading
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ALLOWED
        for reading in readings(path)
    ]
    assert found == []


def test_the_checker_sees_a_reading() -> None:
    sample = PACKAGE / "clock.py"
    assert any("datetime.now()" in r for r in readings(sample))
