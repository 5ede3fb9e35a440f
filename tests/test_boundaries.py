"""The boundaries of the design, checked in fresh interpreters: `ipc/` imports neither torch nor the web stack,
`app/` never imports torch, `text/` neither torch nor the web stack, `engine/` never the web stack, the
engine's core (`engine/core/`: the scheduler, the radix cache, the step plan) neither torch nor the web stack,
and the launcher, `serve/`, never torch (docs/ARCHITECTURE.md). And the seams: `app/` and `text/` reach into
`engine/` only through the torch-free modules listed here, so a new reach shows up as a change to this list."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "ipc": ("torch", "litestar", "granian"),
    "app": ("torch",),
    "text": ("torch", "litestar", "granian"),
    "engine": ("litestar", "granian"),
    "engine/core": ("torch", "litestar", "granian"),
    "serve": ("torch",),  # the serve parent: Granian forks the API workers from it
}
# The engine modules each package may import, at the top of a file or inside a function.
ENGINE_SEAMS = {
    "app": {
        "ringllm.engine.logs",  # structlog set-up shared by every process
        "ringllm.engine.request_stats",  # the engine's histogram names and buckets, which /metrics renders
        "ringllm.engine.config",  # `setting`, how options are declared
    },
    "text": {"ringllm.engine.gguf"},  # a GGUF file's tokenizer, built once into a cache (numpy, no torch)
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


def _engine_imports(path: Path) -> set[str]:
    """The ringllm.engine modules a file imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from ringllm.engine import gguf` imports the module ringllm.engine.gguf
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names if node.module == "ringllm.engine"}
    return {name for name in found if name.startswith("ringllm.engine.")}


@pytest.mark.parametrize("package", sorted(ENGINE_SEAMS))
def test_package_reaches_the_engine_only_through_its_seams(package):
    reaches = {}
    for path in sorted((ROOT / "ringllm" / package).rglob("*.py")):
        reaches.update({name: path.name for name in _engine_imports(path) - ENGINE_SEAMS[package]})
    assert reaches == {}, f"{package}/ imports engine modules outside its seams: {reaches}"
