"""Pinned host buffers that carry each step's index arrays to the device (ModelRunner._to_device), reused
round-robin: `Tensor.pin_memory()` of a fresh array every step costs the host an allocation from the pinned
pool and an extra copy, and a batch-1 decode step is host-bound.

Why reuse is safe: the host writes a buffer only after the device has finished reading it. The copy out of a
buffer is queued on the compute stream and an event recorded right after it; the buffer is next written
`size` steps later, after a synchronize on that event. With the engine's overlap the device runs at most a
step or two behind the host, so the event has long fired and the synchronize returns at once."""

from __future__ import annotations

import numpy as np
import torch

_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


class StagingRing:
    def __init__(self, device: torch.device, size: int, capacity_bytes: int):
        self.device = device
        self.capacity = capacity_bytes
        self.buffers = [torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(size)]
        self.arrays = [b.numpy() for b in self.buffers]
        self.copied = [torch.cuda.Event() for _ in range(size)]  # recorded once each copy out is queued
        self.next = 0

    def send(self, parts: list[np.ndarray], starts: list[int], dtype) -> torch.Tensor | None:
        """`parts` packed into one `dtype` array (part i at element starts[i]; starts[-1] elements in all) and
        copied to the device, or None when they do not fit a buffer. What lies between parts is left as is:
        the caller views each part alone."""
        dtype = np.dtype(dtype)
        nbytes = starts[-1] * dtype.itemsize
        if nbytes > self.capacity or dtype not in _TORCH:
            return None
        i, self.next = self.next, (self.next + 1) % len(self.buffers)
        self.copied[i].synchronize()  # the device has read this buffer's last contents (see the docstring)
        host = self.arrays[i][:nbytes].view(dtype)
        for x, a in zip(parts, starts):
            host[a : a + len(x)] = x
        out = self.buffers[i][:nbytes].view(_TORCH[dtype]).to(self.device, non_blocking=True)
        self.copied[i].record(torch.cuda.current_stream(self.device))
        return out
