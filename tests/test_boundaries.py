"""The three boundaries of the design, checked in fresh interpreters: `ipc/` imports neither torch nor the web
stack, `app/` never imports torch, `engine/` never imports the web stack (docs/ARCHITECTURE.md); and the
launcher, `serve/`, never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "ipc": ("torch", "litestar", "granian"),
    "app": ("torch",),
    "engine": ("litestar", "granian"),
    "serve": ("torch",),  # the serve parent: Granian forks the API workers from it
}


def _modules(package: str) -> list[str]:
    """Every module of `package`, imported by name (so a new file is covered without editing this test)."""
    names = []
    for path in sorted((ROOT / "ringllm" / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _loaded_after_import(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(' '.join(w for w in {watched!r} if w in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_across_its_boundary(package):
    modules = [m for m in _modules(package) if not m.endswith("__main__")]
    assert modules, f"no modules found in {package}/"
    assert _loaded_after_import(modules, FORBIDDEN[package]) == []
