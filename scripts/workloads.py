"""The token-id prompts of the shared benchmark workloads, with no dependencies, so that ringllm's
scripts/bench.py and the vLLM side (scripts/gpu_vllm_bench.py) send exactly the same requests."""

from __future__ import annotations

import random

PREFIX_SYSTEMS, PREFIX_SYSTEM_LEN, PREFIX_SUFFIX_LEN, PREFIX_REQUESTS, PREFIX_MAX_TOKENS = 8, 2048, 64, 256, 128


def prefix_prompts() -> list[list[int]]:
    """256 prompts over 8 system prompts of 2,048 ids, each with 64 ids of its own (greedy, 128 tokens each)."""
    rng = random.Random(2)
    systems = [[rng.randint(0, 10000) for _ in range(PREFIX_SYSTEM_LEN)] for _ in range(PREFIX_SYSTEMS)]
    return [
        systems[i % PREFIX_SYSTEMS] + [rng.randint(0, 10000) for _ in range(PREFIX_SUFFIX_LEN)]
        for i in range(PREFIX_REQUESTS)
    ]
