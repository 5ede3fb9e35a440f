"""KV slots as the host sees them: which are free. A slot is one token's K/V in every layer's pool
(engine/kv_cache.py holds the tensors); here it is only a number.

Slot 0 is never handed out: padded positions (CUDA-graph batches) write their K/V there harmlessly."""

from __future__ import annotations

import numpy as np

# Tokens per KV page. The scheduler, the radix cache and the slot allocator work in tokens, and the attention
# backends hand FlashInfer one-token pages: changing this needs all of them changed, not just the constant.
PAGE_SIZE = 1


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

    def free_slots(self) -> np.ndarray:
        """A copy of the free slots (for checks; the allocator never needs it)."""
        return self._free[: self._top].copy()

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
