"""Token-granular KV storage (a page is one slot, engine/core/slots.py); its sizing is the runner's
(engine/runner/memory.py).

Slot 0 is never handed out: padded positions (CUDA-graph batches) write their K/V there harmlessly."""

from __future__ import annotations

import torch

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
