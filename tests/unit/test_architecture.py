"""The architecture as a contract: `lint-imports` with the contracts in pyproject.toml [tool.importlinter].

The protocol core imports no Kafka, Redis, CLI, telemetry or Faust and no other
room of the package; CLI command modules do not import each other. The second
test shows the contract bites: the same check fails on a copy of the package
whose protocol imports redis.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run lint-imports in `cwd` (it analyses the knhk_stream found there, with cwd's pyproject.toml)."""
    exe = Path(sys.executable).parent / "lint-imports"
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]' (it brings import-linter)")
    return subprocess.run(
        [found, "--no-cache", "--no-logo"], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_import_contracts_hold() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_import_contract_fails_when_the_protocol_imports_redis(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "knhk_stream", tmp_path / "knhk_stream", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    module = tmp_path / "knhk_stream" / "protocol" / "encoding.py"
    module.write_text(module.read_text("utf-8") + "\nimport redis  # noqa: E402\n", "utf-8")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout + done.stderr
    assert "knhk_stream.protocol is not allowed to import redis" in done.stdout, done.stdout
    assert "knhk_stream.protocol.encoding -> redis" in done.stdout, done.stdout


def test_no_module_makes_threads_or_executors_at_import() -> None:
    """No work at import time: e.g. the verification thread pool is made on the first verification."""
    code = """
import concurrent.futures, importlib, pkgutil, threading
import knhk_stream
found = []
for m in pkgutil.walk_packages(knhk_stream.__path__, "knhk_stream."):
    if m.name.endswith("__main__"):
        continue
    try:
        module = importlib.import_module(m.name)
    except ImportError:
        continue  # an extra that is not installed
    found += [f"{m.name}.{k}" for k, v in vars(module).items()
              if isinstance(v, (concurrent.futures.Executor, threading.Thread))]
assert not found, found
assert [t.name for t in threading.enumerate()] == ["MainThread"], threading.enumerate()
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
