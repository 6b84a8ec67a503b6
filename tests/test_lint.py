"""ruff is part of the suite, so the one test command also checks style."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    result = subprocess.run(
        [ruff, "check", "iqmaild", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stage_boundaries_hold() -> None:
    """import-linter contracts (pyproject.toml): core pure, deliver a leaf, parse reads only,
    storage knows no stage, web only speaks HTTP, only the wiring points build the daemon."""
    lint = shutil.which("lint-imports")
    assert lint is not None, "import-linter is a test dependency"
    result = subprocess.run(
        [lint], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
