"""ringllm's cache directory, one rule for everything kept there (the demo model, GGUF tokenizers, the kernel
caches, the tests' real model): $RINGLLM_CACHE, else ~/.cache/ringllm. Imports nothing heavy: the API workers'
tokenizer loader reads it too."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def cache_root(env: Mapping[str, str] | None = None) -> Path:
    """$RINGLLM_CACHE (from `env`, default the process environment), else ~/.cache/ringllm."""
    env = os.environ if env is None else env
    return Path(env.get("RINGLLM_CACHE") or Path.home() / ".cache" / "ringllm")
