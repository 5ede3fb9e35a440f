"""What every attention backend gets for one step, and the interface it implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np
import torch

from ringllm.engine.attention.cascade import CascadeMetadata, GraphCascade
from ringllm.engine.kv_cache import KVPool


@dataclass
class AttentionMetadata:
    """Host-side lengths (for planning without a device sync) and device-side indices of one step."""

    qo_indptr_host: np.ndarray  # [B+1] new-token offsets per sequence
    kv_indptr_host: np.ndarray  # [B+1] offsets of each sequence's slots in kv_indices
    kv_lens_host: np.ndarray  # [B] positions attended to (cached + new)
    is_decode: bool
    qo_indptr: torch.Tensor  # the same on the device
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor  # [sum kv_lens] slot of every attended position, gathered on the device
    out_slots: torch.Tensor  # [T] slot each new token's K/V goes to
    # A decode step whose rows share cached prefixes, where the backend runs cascade (engine/attention/cascade.py)
    cascade: CascadeMetadata | None = None

    @property
    def batch_size(self) -> int:
        return len(self.kv_lens_host)


class AttentionBackend(abc.ABC):
    """Stores the new tokens' K/V into the pool and attends over each sequence's slots (causal inside the
    new tokens, full over the cached prefix).

    A layer either calls `forward` (the backend stores K/V, then attends), or, where `kv_store_target` gives
    the cache, writes K/V itself in a fused kernel and calls `attend`. A backend whose decode steps can be
    captured in CUDA graphs sets `supports_cuda_graphs` and implements the two graph hooks
    (engine/runner/cuda_graph.py calls them); by default a backend runs without graphs."""

    supports_cuda_graphs = False
    supports_cascade = False  # runs decode steps given AttentionMetadata.cascade (a backend may ignore it)
    supports_cascade_graphs = False  # also inside CUDA graphs (make_graph_cascade, begin_graph's cascade)

    def __init__(self, pool: KVPool, num_heads: int, head_dim: int):
        self.pool = pool
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.meta: AttentionMetadata | None = None
        self.out_slots: torch.Tensor | None = None  # [T] where this step's K/V go (a graph's static buffer)

    def begin(self, meta: AttentionMetadata) -> None:
        """Called once per step before the forward."""
        self.meta = meta
        self.out_slots = meta.out_slots

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Writes the new tokens' K/V into the layer's cache, at `out_slots`."""
        assert self.out_slots is not None, "begin() comes before the forward"
        self.pool.store(layer, self.out_slots, k, v)

    # ---- CUDA graphs (only where supports_cuda_graphs) ----
    def make_graph_decoder(self, bs: int, indices_buffer: torch.Tensor) -> None:
        """Prepares decoding at batch size `bs` over fixed buffers, before that graph is captured."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def make_graph_cascade(self, bs: int, shared_indices_buffer: torch.Tensor) -> None:
        """Prepares cascade decoding at batch size `bs` over fixed buffers (after make_graph_decoder(bs)), before
        that cascade graph is captured; level 0's slot indices live in `shared_indices_buffer`."""
        raise NotImplementedError(f"{type(self).__name__} does not run cascade attention in CUDA graphs")

    def begin_graph(
        self,
        bs: int,
        kv_indptr_host: np.ndarray,
        kv_indices: torch.Tensor,
        out_slots: torch.Tensor,
        cascade: GraphCascade | None = None,
    ) -> None:
        """`begin` for a replay (or the capture) of the graph of batch size `bs`; with `cascade`, of its cascade
        graph, and then kv_indptr_host/kv_indices are level 1's (each row's own slots past its group's prefix)."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def kv_store_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(k_cache, v_cache, slots) for a kernel that writes this step's K/V into the layer's cache itself
        and then calls `attend`; None when the backend stores K/V in `forward`."""
        return None

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention over the cache once this step's K/V are stored (backends with a kv_store_target)."""
        raise NotImplementedError(f"{type(self).__name__} stores K/V in forward()")

    @abc.abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] of the new tokens. Returns [T, heads, head_dim]."""
