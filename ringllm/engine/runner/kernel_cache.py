"""Where compiled kernels are kept across runs: Triton's cache and FlashInfer's JIT workspace, under ringllm's
cache directory ($RINGLLM_CACHE, default ~/.cache/ringllm), so that a restart loads what an earlier run (or the
container image's build: Containerfile) compiled instead of compiling it again.

Each library reads its variable from the environment: FlashInfer once, when `flashinfer` is first imported
(flashinfer/jit/env.py: FLASHINFER_WORKSPACE_BASE, under which it keeps .cache/flashinfer/<arch>/cached_ops),
Triton whenever it opens its cache (TRITON_CACHE_DIR). So `use_kernel_caches` runs first thing in the model
runner, before the attention backend imports FlashInfer or any kernel compiles; the worker ranks run it too (a
rank on another host has its own cache). A variable the user set is never overridden. Importing this module
imports neither library."""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

from ringllm.engine.cache_dir import cache_root
from ringllm.engine.logs import get_logger

log = get_logger("engine.kernel_cache")

# variable -> the folder under the cache root it points at
KERNEL_CACHE_VARIABLES = {"TRITON_CACHE_DIR": "triton", "FLASHINFER_WORKSPACE_BASE": "flashinfer"}
# what a compiled kernel leaves in each cache: Triton a <hash>/<kernel>.cubin, FlashInfer a <module>/<module>.so
# (under .cache/flashinfer/<arch>/cached_ops); the name of what was compiled is the file's stem
KERNEL_FILES = {"TRITON_CACHE_DIR": "*.cubin", "FLASHINFER_WORKSPACE_BASE": "*.so"}


def use_kernel_caches(env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Points each kernel cache the user has not pointed elsewhere at its folder under the cache root (creating
    it). Returns the variables it set (none when the user set them all, or on a second call)."""
    env = os.environ if env is None else env
    root = cache_root(env)
    chosen = {}
    for name, folder in KERNEL_CACHE_VARIABLES.items():
        if env.get(name):
            continue
        path = root / folder
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only home: the libraries' own defaults still work, only uncached
            log.warning(
                "kernel cache not writable; using the library's default", variable=name, path=str(path), error=str(e)
            )
            continue
        env[name] = chosen[name] = str(path)
    if chosen:
        log.debug("kernel caches", **chosen)
    return chosen


def cached_kernels(env: MutableMapping[str, str] | None = None) -> set[str]:
    """Every compiled kernel in the caches the environment points at, as "<cache>/<relative path>": compare two
    of these to see what a run compiled (anything it loaded from the cache was there before)."""
    env = os.environ if env is None else env
    found = set()
    for name, pattern in KERNEL_FILES.items():
        root = env.get(name)
        if root and Path(root).is_dir():
            found |= {f"{name}/{p.relative_to(root)}" for p in Path(root).rglob(pattern)}
    return found


def kernel_names(entries: set[str]) -> list[str]:
    """The kernels' names (file stems) of cached_kernels entries, sorted: what the log shows."""
    return sorted(Path(e).stem for e in entries)
