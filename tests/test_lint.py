"""Static checks of the whole repository, run with the test suite so that CI keeps them green: mypy, ruff, and
hadolint on the Containerfile (skipped where hadolint is not installed).

mypy and ruff read their configuration from pyproject.toml ([tool.mypy]: app, ipc and engine, with the cache under
.mypy_cache, which keeps a rerun to a few seconds)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True)


def test_mypy() -> None:
    result = _run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_check() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


BIN = Path(sys.executable).parent


@pytest.mark.skipif(
    not (BIN / "hadolint").exists() and shutil.which("hadolint") is None, reason="hadolint is not installed"
)
def test_containerfile_lints_clean():
    exe = str(BIN / "hadolint") if (BIN / "hadolint").exists() else shutil.which("hadolint")
    run = subprocess.run(
        [exe, "--failure-threshold", "info", str(ROOT / "Containerfile")], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
