"""Token-granular KV storage (a page is one slot, engine/core/slots.py) and its sizing.

Slot 0 is never handed out: padded positions (CUDA-graph batches) write their K/V there harmlessly."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ringllm.engine.config import EngineConfig

# fp8 KV (--kv-cache-dtype fp8) is float8_e4m3fn with a scale of 1.0, as vLLM without calibrated scales: values
# beyond +-448 are clamped on store (the cast alone would make them NaN), and below 2**-6 precision fades into
# subnormals down to 2**-9. Keys come out of RMSNorm + rotary and values out of a projection, well inside that.
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448.0


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The storage dtype of the KV cache for `EngineConfig.kv_cache_dtype`."""
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return FP8_KV_DTYPE
    raise ValueError(f"unknown kv_cache_dtype {name!r}")


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as stored in a cache of `dtype`: clamped into fp8's range first, so nothing turns into NaN."""
    if dtype == FP8_KV_DTYPE:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x


class KVPool:
    """Per-layer K and V of shape [slots, kv_heads, head_dim] on the model's device, stored in `kv_dtype`
    (default: `dtype`, the model's); `dtype` is what goes in and what attention computes in."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        kv_dtype: torch.dtype | None = None,
    ):
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.k = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = to_cache_dtype(k, self.kv_dtype)
        self.v[layer][slots] = to_cache_dtype(v, self.kv_dtype)


# ---- sizing ----
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
