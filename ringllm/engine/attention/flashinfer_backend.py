"""FlashInfer attention over the token-slot pool (pages of PAGE_SIZE = 1 token: a page is a slot).

Mixed and prefill steps use the paged prefill kernel over each sequence's whole slot list (cached prefix and
new tokens alike, causal at the end). Decode steps use the batch decode kernel; with CUDA graphs each
captured batch size has its own decode wrapper over fixed index buffers, planned again before every replay.
Plans read lengths from host arrays the scheduler already has, so planning never waits on the device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ringllm.engine.attention.base import AttentionBackend, AttentionMetadata
from ringllm.engine.attention.cascade import FlashInferCascade, FlashInferGraphCascade, GraphCascade
from ringllm.engine.core.cascade import MAX_GROUPS
from ringllm.engine.core.slots import PAGE_SIZE

WORKSPACE_BYTES = 256 << 20


class FlashInferAttention(AttentionBackend):
    supports_cuda_graphs = True
    supports_cascade = True
    supports_cascade_graphs = True

    def __init__(self, pool, num_heads: int, head_dim: int):
        import flashinfer

        super().__init__(pool, num_heads, head_dim)
        self.fi = flashinfer
        self.num_kv_heads = pool.k.shape[2]
        # q and the output are in the model's dtype; the cache may be fp8 (FlashInfer's FA2 kernels take bf16 q
        # over fp8 K/V, with k_scale/v_scale left at 1.0, the scale the pool stores with)
        self.dtype, self.kv_dtype = pool.dtype, pool.kv_dtype
        self.tensor_core_decode = num_heads // self.num_kv_heads >= 4
        self._build_wrappers(pool.k.device)
        self._graph_workspace: torch.Tensor | None = None
        self.graph_decoders: dict[int, Any] = {}  # flashinfer decode wrappers, by batch size
        self.graph_cascades: dict[int, FlashInferGraphCascade] = {}  # by batch size
        self._graph_prefill: Any = None  # level 0 of every cascade graph (make_graph_cascade)
        self._merge_mask: torch.Tensor | None = None
        self.wrapper: Any = None  # the wrapper planned for this step (begin, begin_graph)
        self._last_page_lens = torch.full((4096,), PAGE_SIZE, dtype=torch.int32)  # every page is full

    def _build_wrappers(self, device) -> None:
        """The eager wrappers: prefill, decode, and the cascade over both."""
        self.prefill = self.fi.BatchPrefillWithPagedKVCacheWrapper(self._workspace(device), "NHD")
        self.decode = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace(device), "NHD", use_tensor_cores=self.tensor_core_decode
        )
        # A cascade step plans both eager wrappers (level 0 on the prefill one, level 1 on the decode one).
        self.cascade = FlashInferCascade(
            self.fi, self.prefill, self.decode, self.num_heads, self.num_kv_heads, self.head_dim, PAGE_SIZE
        )

    @staticmethod
    def _workspace(device) -> torch.Tensor:
        return torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)

    # ---- planning ----
    def _last_page_len(self, n: int) -> torch.Tensor:
        if n > len(self._last_page_lens):
            self._last_page_lens = torch.full((n,), PAGE_SIZE, dtype=torch.int32)
        return self._last_page_lens[:n]

    def begin(self, meta: AttentionMetadata) -> None:
        super().begin(meta)
        kv_indptr = torch.from_numpy(meta.kv_indptr_host.astype(np.int32))
        lpl = self._last_page_len(meta.batch_size)
        kinds = dict(q_data_type=self.dtype, kv_data_type=self.kv_dtype)
        if meta.cascade is not None:
            self.wrapper = self.cascade
            self.cascade.plan(meta.cascade, self._last_page_len, **kinds)
        elif meta.is_decode:
            self.wrapper = self.decode
            self.decode.plan(
                kv_indptr, meta.kv_indices, lpl, self.num_heads, self.num_kv_heads, self.head_dim, PAGE_SIZE, **kinds
            )
        else:
            self.wrapper = self.prefill
            qo_indptr = torch.from_numpy(meta.qo_indptr_host.astype(np.int32))
            self.prefill.plan(
                qo_indptr,
                kv_indptr,
                meta.kv_indices,
                lpl,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                PAGE_SIZE,
                causal=True,
                **kinds,
            )

    # ---- CUDA graphs ----
    def make_graph_decoder(self, bs: int, indices_buffer: torch.Tensor) -> None:
        """A decode wrapper with fixed buffers for batch size `bs`; all share one indices buffer (one graph
        runs at a time)."""
        device = self.pool.k.device
        if self._graph_workspace is None:
            self._graph_workspace = self._workspace(device)
        self.graph_decoders[bs] = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self._graph_workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self.tensor_core_decode,
            paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=device),
            paged_kv_indices_buffer=indices_buffer,
            paged_kv_last_page_len_buffer=torch.full((bs,), PAGE_SIZE, dtype=torch.int32, device=device),
        )

    def make_graph_cascade(self, bs: int, shared_indices_buffer: torch.Tensor) -> None:
        """The cascade graph of batch size `bs`: level 1 on the bucket's graph decode wrapper, level 0 on one
        graph-mode prefill wrapper over MAX_GROUPS + 1 entries (engine/attention/cascade.py GraphCascade)
        that every bucket shares: its entry count is the same for all, and the first plan, at the largest
        bucket (captured first), fixes its most query rows. One graph runs at a time and each is planned
        before its replay, so sharing the wrapper, the merge mask and the float workspace (the kernels run
        one after the other) is safe."""
        device = self.pool.k.device
        if self._graph_prefill is None:
            entries = MAX_GROUPS + 1
            self._graph_prefill = self.fi.BatchPrefillWithPagedKVCacheWrapper(
                self._graph_workspace,
                "NHD",
                use_cuda_graph=True,
                qo_indptr_buf=torch.zeros(entries + 1, dtype=torch.int32, device=device),
                paged_kv_indptr_buf=torch.zeros(entries + 1, dtype=torch.int32, device=device),
                paged_kv_indices_buf=shared_indices_buffer,
                paged_kv_last_page_len_buf=torch.full((entries,), PAGE_SIZE, dtype=torch.int32, device=device),
            )
            self._merge_mask = torch.zeros(bs, dtype=torch.uint8, device=device)  # the kernel reads uint8
        mask = self._merge_mask
        assert mask is not None and bs <= len(mask), "the largest cascade graph comes first"
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, PAGE_SIZE)
        self.graph_cascades[bs] = FlashInferGraphCascade(
            self.fi, self._graph_prefill, self.graph_decoders[bs], mask[:bs], heads, self._last_page_len
        )

    def begin_graph(
        self,
        bs: int,
        kv_indptr_host: np.ndarray,
        kv_indices: torch.Tensor,
        out_slots: torch.Tensor,
        cascade: GraphCascade | None = None,
    ) -> None:
        """Plans the graph wrapper of batch size `bs` (lengths already padded to bs), or with `cascade` both of
        its cascade graph's, and points the layers at the graph's static slot buffer."""
        self.out_slots = out_slots
        if cascade is not None:
            self.wrapper = self.graph_cascades[bs]
            self.wrapper.plan(cascade, kv_indices, self.dtype, self.kv_dtype)
            return
        wrapper = self.graph_decoders[bs]
        wrapper.plan(
            torch.from_numpy(kv_indptr_host.astype(np.int32)),
            kv_indices,
            self._last_page_len(bs),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            PAGE_SIZE,
            q_data_type=self.dtype,
            kv_data_type=self.kv_dtype,
        )
        self.wrapper = wrapper

    # ---- the layer call ----
    def kv_store_target(self, layer: int):
        # Under a CUDA graph `out_slots` is the graph's static slot buffer, so the captured kernel reads it.
        return self.pool.k[layer], self.pool.v[layer], self.out_slots

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        # [pages, PAGE_SIZE, kv_heads, D]
        paged = (k_cache.unflatten(0, (-1, PAGE_SIZE)), v_cache.unflatten(0, (-1, PAGE_SIZE)))
        return self.wrapper.run(q, paged)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.store_kv(layer, k, v)
        return self.attend(layer, q)
