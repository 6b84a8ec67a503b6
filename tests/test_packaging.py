"""`pip install .` carries templates and migrations inside the package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_templates_and_migrations(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    wheel = next(tmp_path.glob("iqmaild-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "iqmaild/templates/mail/pl/auth_request.txt" in names
    assert "iqmaild/templates/web/en/authorize.html" in names
    assert "iqmaild/migrations/env.py" in names
    assert any(n.startswith("iqmaild/migrations/versions/0001") for n in names)
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "iqmaild = iqmaild.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()
