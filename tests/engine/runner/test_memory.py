"""The KV pool's sizing (engine/runner/memory.py): a fixed count, or what the CPU budget holds (the GPU path
profiles a forward: test_memory is covered there by the engine tests on CUDA)."""

import pytest
import torch

from ringllm.engine.config import EngineConfig
from ringllm.engine.kv_cache import KVPool
from ringllm.engine.runner.memory import kv_pool_slots

CPU = torch.device("cpu")


def _never_profiled() -> int:
    raise AssertionError("the forward is profiled only on a GPU")


def test_kv_pool_slots_from_tokens_or_the_cpu_budget():
    per_token = KVPool.bytes_per_token(2, 2, 8, torch.float32)  # 256 bytes
    # kv_cache_tokens, plus slot 0 (never handed out)
    assert kv_pool_slots(EngineConfig(kv_cache_tokens=100), per_token, CPU, _never_profiled) == 101
    assert kv_pool_slots(EngineConfig(cpu_kv_cache_gb=1 / 1024), per_token, CPU, _never_profiled) == 4096
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        kv_pool_slots(EngineConfig(cpu_kv_cache_gb=1e-9), per_token, CPU, _never_profiled)
