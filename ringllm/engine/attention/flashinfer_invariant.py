"""FlashInfer attention for deterministic inference (engine/determinism.py): every row computed the same way
whatever the batch, the chunk and the cache.

Every step, decode or prefill, eager or replayed in a CUDA graph, runs one kernel: FlashInfer's FA2 paged
prefill kernel, causal, with split-KV disabled (`disable_split_kv`; FlashInfer otherwise splits a sequence's
keys across blocks when the batch is small, and merges the parts in another order) and its query tile fixed at
16 packed rows. Within that kernel a query row's reduction runs over its own keys in blocks aligned at key 0,
in order; blocks past its causal limit add exact zeros. So a position's output depends only on its keys:
decode equals prefill, one chunking equals another, a cache hit equals a cold prefill. A decode row is a
prefill row of query length 1 at the end of its sequence.

The query tile: FlashInfer's planner takes it from the batch's mean packed query length (query tokens x query
heads per KV head): 16 up to 16, 64 up to 64, 128 beyond, and the tiles reduce in different block shapes. An
eager plan gets empty entries (no query rows, no keys: no work) appended until the mean is at most 16
(`fixed_tile_indptrs`). A CUDA graph's plan derives it from one query row per sequence, the packed length of
one token: 16 when the model has at most 16 query heads per KV head. A model with more runs without CUDA
graphs here (`supports_cuda_graphs`). Cascade attention is not run: its merge of two partial softmaxes is
another reduction order."""

from __future__ import annotations

import numpy as np
import torch

from ringllm.engine.attention.base import AttentionBackend, AttentionMetadata
from ringllm.engine.attention.cascade import GraphCascade
from ringllm.engine.attention.flashinfer_backend import FlashInferAttention
from ringllm.engine.core.slots import PAGE_SIZE

TILE_ROWS = 16  # FA2's smallest query tile, which FlashInfer picks when the mean packed query length is <= 16


def fixed_tile_indptrs(qo_indptr: np.ndarray, kv_indptr: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The plan's (qo_indptr, kv_indptr) with empty entries appended, so that the mean packed query length
    (total query rows x `group` query heads per KV head over the entries) is at most TILE_ROWS."""
    entries = len(qo_indptr) - 1
    needed = -(-int(qo_indptr[-1]) * group // TILE_ROWS)
    extra = max(needed - entries, 0)
    if not extra:
        return qo_indptr, kv_indptr
    return np.concatenate([qo_indptr, np.full(extra, qo_indptr[-1])]), np.concatenate(
        [kv_indptr, np.full(extra, kv_indptr[-1])]
    )


class BatchInvariantFlashInfer(FlashInferAttention):
    supports_cascade = False
    supports_cascade_graphs = False

    def __init__(self, pool, num_heads: int, head_dim: int):
        super().__init__(pool, num_heads, head_dim)
        self.group = num_heads // self.num_kv_heads
        # A graph plan cannot be given empty entries: its tile follows from one token's packed rows.
        self.supports_cuda_graphs = self.group <= TILE_ROWS

    def _build_wrappers(self, device) -> None:
        # FA2 explicitly: "auto" takes FA3 on Hopper, whose plan has no switch for split-KV or the tile.
        self.prefill = self.fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace(device), "NHD", backend="fa2")

    def _plan(self, wrapper, qo_indptr: np.ndarray, kv_indptr: np.ndarray, kv_indices: torch.Tensor) -> None:
        wrapper.plan(
            torch.from_numpy(qo_indptr.astype(np.int32)),
            torch.from_numpy(kv_indptr.astype(np.int32)),
            kv_indices,
            self._last_page_len(len(qo_indptr) - 1),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            PAGE_SIZE,
            causal=True,
            q_data_type=self.dtype,
            kv_data_type=self.kv_dtype,
            disable_split_kv=True,
        )
        self.wrapper = wrapper

    def begin(self, meta: AttentionMetadata) -> None:
        """Every step through the prefill kernel (decode rows are query rows of length 1), planned eagerly."""
        AttentionBackend.begin(self, meta)  # not FlashInferAttention.begin: that plans its own wrappers
        qo, kv = fixed_tile_indptrs(meta.qo_indptr_host, meta.kv_indptr_host, self.group)
        self._plan(self.prefill, qo, kv, meta.kv_indices)

    def make_graph_decoder(self, bs: int, indices_buffer: torch.Tensor) -> None:
        """The graph of batch size `bs` runs the same prefill kernel over bs query rows of length 1."""
        device = self.pool.k.device
        if self._graph_workspace is None:
            self._graph_workspace = self._workspace(device)
        wrapper = self.fi.BatchPrefillWithPagedKVCacheWrapper(
            self._graph_workspace,
            "NHD",
            use_cuda_graph=True,
            qo_indptr_buf=torch.arange(bs + 1, dtype=torch.int32, device=device),
            paged_kv_indptr_buf=torch.zeros(bs + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buf=indices_buffer,
            paged_kv_last_page_len_buf=torch.full((bs,), PAGE_SIZE, dtype=torch.int32, device=device),
            backend="fa2",
        )
        # Without split-KV, a graph plan launches a fixed grid (FlashInfer 0.6 scheduler.cuh: at least 2 blocks
        # per SM over the KV heads) but writes work entries only for the blocks it has; the others read the
        # entries as the host buffer holds them. Zeroed, they all name sequence 0's first query tile, which
        # those blocks then recompute to the same values; left as they are (a reused pinned block), they
        # could name a sequence past the batch.
        pinned = getattr(wrapper, "_pin_memory_int_workspace_buffer", None)
        if pinned is not None:
            pinned.zero_()
        self.graph_decoders[bs] = wrapper

    def begin_graph(
        self,
        bs: int,
        kv_indptr_host: np.ndarray,
        kv_indices: torch.Tensor,
        out_slots: torch.Tensor,
        cascade: GraphCascade | None = None,
    ) -> None:
        assert cascade is None, "deterministic inference runs no cascade attention"
        self.out_slots = out_slots
        self._plan(self.graph_decoders[bs], np.arange(bs + 1), kv_indptr_host, kv_indices)
