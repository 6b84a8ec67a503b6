"""The core is pure (STYLE.md): no I/O, no clock, no randomness, typed strictly."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import iqmaild.core

CORE = Path(iqmaild.core.__file__).parent
ROOT = CORE.parent.parent
MODULES = sorted(CORE.glob("*.py"))

FORBIDDEN = frozenset(
    {
        "asyncio",
        "sqlalchemy",
        "aiosmtpd",
        "aiosmtplib",
        "aioimaplib",
        "aiohttp",
        "aiosqlite",
        "asyncpg",
        "alembic",
        "jinja2",
        "socket",
        "ssl",
        "os",
        "sys",
        "io",
        "pathlib",
        "shutil",
        "subprocess",
        "threading",
        "time",
        "random",
        "secrets",
        "uuid",
        "logging",
        "structlog",
        "importlib",
        "smtplib",
        "imaplib",
        "urllib",
        "http",
    }
)
# Calls that read the clock or the environment; time is passed in.
FORBIDDEN_CALLS = frozenset({"now", "utcnow", "today", "open", "__import__", "getenv"})


def _imports(tree: ast.Module, module: str) -> list[str]:
    names: list[str] = []
    package = module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.append(f"{base}.{node.module}" if node.module else base)
            else:
                names.append(node.module or "")
    return names


def test_core_has_modules() -> None:
    assert {p.stem for p in MODULES} >= {
        "vocabulary",
        "tag",
        "addresses",
        "threadref",
        "facts",
        "policy",
        "ratelimit",
    }


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_core_module_imports_no_io(path: Path) -> None:
    module = f"iqmaild.core.{path.stem}"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for name in _imports(tree, module):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{module} imports {name}"
        if top == "iqmaild":
            assert name == "iqmaild.core" or name.startswith("iqmaild.core."), (
                f"{module} imports {name}"
            )


@pytest.mark.parametrize("path", MODULES, ids=[p.stem for p in MODULES])
def test_core_module_reads_no_clock(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            assert name not in FORBIDDEN_CALLS, f"{path.name}:{node.lineno} calls {name}()"


def test_relative_imports_are_resolved() -> None:
    tree = ast.parse("from . import tag\nfrom ..storage import db\nimport os.path\n")
    assert _imports(tree, "iqmaild.core.policy") == ["iqmaild.core", "iqmaild.storage", "os.path"]


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_mypy_strict_on_core(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "mypy-cache"),
            "iqmaild/core",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
