"""How many KV slots this rank's pool gets: a fixed count, what a CPU budget holds, or on a GPU what is left
of --gpu-memory-utilization once the weights are loaded and one forward's peak (measured with a throwaway
pool over a full token budget) is set aside. Every rank of a parallel engine takes the smallest count, since
every rank holds every slot."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ringllm.engine import parallel
from ringllm.engine.attention import AttentionMetadata, make_backend
from ringllm.engine.config import EngineConfig
from ringllm.engine.kv_cache import KVPool


def pool_slots(config: EngineConfig, model, context_len: int, kv_dtype: torch.dtype, device: torch.device) -> int:
    """The slots of this rank's KV pool for `model` (this stage's layers), the same on every rank."""
    attn0 = model.layers[0].self_attn
    per_token = KVPool.bytes_per_token(len(model.layers), attn0.num_kv_heads, model.shape.head_dim, kv_dtype)
    slots = kv_pool_slots(config, per_token, device, lambda: activation_peak(config, model, context_len, kv_dtype))
    return parallel.all_ranks_min(slots, device)


# Set aside beyond the forward's peak: attention workspaces, CUDA graphs, sampler temporaries.
RESERVED_GPU_BYTES = 2 << 30


def kv_pool_slots(
    config: EngineConfig, bytes_per_token: int, device: torch.device, activation_peak: Callable[[], int]
) -> int:
    """How many slots this rank's pool gets: `kv_cache_tokens` when set; on a GPU what is left of
    `gpu_memory_utilization` once the weights are loaded and the forward's peak (`activation_peak`, measured
    only here) is set aside; on the CPU `cpu_kv_cache_gb`."""
    if config.kv_cache_tokens:
        return config.kv_cache_tokens + 1
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peak = activation_peak()
        budget = total * config.gpu_memory_utilization - (total - free) - peak - RESERVED_GPU_BYTES
    else:
        budget = config.cpu_kv_cache_gb * (1 << 30)
    slots = int(budget // bytes_per_token)
    if slots < 2:
        raise ValueError(
            f"no memory left for the KV cache ({budget / 2**30:.2f} GiB budget, "
            f"{bytes_per_token} bytes per token): lower the model size or raise the memory budget"
        )
    return slots


def peak_bytes(device: torch.device, run: Callable[[], object]) -> int:
    """Peak device memory `run` allocates beyond what was allocated before it; what it made is freed after."""
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak


def activation_peak(config: EngineConfig, model, context_len: int, kv_dtype: torch.dtype) -> int:
    """Peak memory of one forward over a full token budget, with a throwaway pool."""
    n = min(config.max_num_batched_tokens, context_len)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    attn0, shape, lay = model.layers[0].self_attn, model.shape, model.layout

    def forward() -> None:
        pool = KVPool(len(model.layers), n + 1, attn0.num_kv_heads, shape.head_dim, dtype, device, kv_dtype)
        attn = make_backend(config.attention_backend, device, pool, attn0.num_heads, shape.head_dim)
        idx = torch.arange(1, n + 1, device=device, dtype=torch.int32)
        indptr = torch.tensor([0, n], device=device, dtype=torch.int32)
        attn.begin(
            AttentionMetadata(np.array([0, n]), np.array([0, n]), np.array([n]), False, indptr, indptr, idx, idx)
        )
        carry = None
        if not lay.is_first_stage:
            carry = tuple(torch.zeros(n, shape.hidden_size, dtype=dtype, device=device) for _ in "hr")
        with torch.inference_mode():
            hidden = model(torch.zeros(n, dtype=torch.long, device=device), torch.arange(n, device=device), attn, carry)
            if lay.is_last_stage:
                model.logits(hidden[-config.max_bs :])

    return peak_bytes(device, forward)
