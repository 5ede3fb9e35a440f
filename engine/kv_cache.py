"""Token-granular KV storage (page size 1) and the host-side bookkeeping of which slots are free.

Slot 0 is never handed out: padded positions (CUDA-graph batches) write their K/V there harmlessly."""

from __future__ import annotations

import numpy as np
import torch


class SlotAllocator:
    """Free slots as one host int32 array used as a stack: allocating or freeing n slots is one slice or one
    copy, never a Python loop over tokens. Host-side numpy: these are bookkeeping, not device data."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self._free = np.arange(num_slots - 1, 0, -1, dtype=np.int32)  # slot 1 on top
        self._top = num_slots - 1

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def capacity(self) -> int:
        return self.num_slots - 1

    def alloc(self, n: int) -> np.ndarray | None:
        if n > self._top:
            return None
        self._top -= n
        return self._free[self._top : self._top + n][::-1].copy()

    def free(self, slots: np.ndarray) -> None:
        n = len(slots)
        if n == 0:
            return
        if self._top + n > len(self._free):
            raise RuntimeError("slot allocator: more slots freed than were allocated")
        self._free[self._top : self._top + n] = slots[::-1]
        self._top += n


class KVPool:
    """Per-layer K and V of shape [slots, kv_heads, head_dim] on the model's device."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = k
        self.v[layer][slots] = v
