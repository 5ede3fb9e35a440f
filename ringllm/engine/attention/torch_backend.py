"""Plain-torch attention: gathers K/V by slot and runs scaled-dot-product attention per sequence. It runs on
any device and is the reference the fast backends are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ringllm.engine.attention.base import AttentionBackend


class TorchAttention(AttentionBackend):
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        assert meta is not None, "begin() comes before the forward"
        self.store_kv(layer, k, v)
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        out = torch.empty_like(q)
        qo, kvp = meta.qo_indptr_host, meta.kv_indptr_host
        for i in range(meta.batch_size):
            q_i = q[qo[i] : qo[i + 1]].transpose(0, 1)  # [H, n, D]
            idx = meta.kv_indices[kvp[i] : kvp[i + 1]]
            # an fp8 cache is upcast to the compute dtype once gathered (a no-op when it is stored in it)
            k_i = k_cache[idx].to(q.dtype).transpose(0, 1)  # [Hkv, S, D]
            v_i = v_cache[idx].to(q.dtype).transpose(0, 1)
            n, s = q_i.shape[1], k_i.shape[1]
            # query j sits at position s - n + j and sees keys 0 ..= s - n + j
            mask = None
            if n > 1:
                mask = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=s - n)
            o = F.scaled_dot_product_attention(q_i, k_i, v_i, attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[qo[i] : qo[i + 1]] = o.transpose(0, 1)
        return out


class BatchInvariantTorchAttention(TorchAttention):
    """Deterministic inference (engine/determinism.py): each query row attends on its own, through two matmuls
    whose shapes ([kv heads, group, head dim] x [position + 1 keys]) depend on its position alone, so a
    position's result is the same in a decode step, in any prefill chunk and after a cache hit. (SDPA sizes its
    blocks by the chunk's query count, and its reductions by the chunk's key count.) One row at a time: slow,
    as a reference."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        assert meta is not None, "begin() comes before the forward"
        self.store_kv(layer, k, v)
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        out = torch.empty_like(q)
        qo, kvp = meta.qo_indptr_host, meta.kv_indptr_host
        num_kv = k_cache.shape[1]
        group = self.num_heads // num_kv
        for i in range(meta.batch_size):
            idx = meta.kv_indices[kvp[i] : kvp[i + 1]]
            # [S, Hkv, D]: a row's first p + 1 keys are a prefix with the same strides whatever S is
            k_i, v_i = k_cache[idx].to(q.dtype), v_cache[idx].to(q.dtype)
            n, s = int(qo[i + 1] - qo[i]), len(idx)
            for j in range(n):
                keys = s - n + j + 1  # query j sits at position s - n + j
                q_j = q[qo[i] + j].view(num_kv, group, self.head_dim)
                scores = torch.matmul(q_j, k_i[:keys].permute(1, 2, 0)) * self.scale  # [Hkv, group, keys]
                p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
                out[qo[i] + j] = torch.matmul(p, v_i[:keys].transpose(0, 1)).view(self.num_heads, self.head_dim)
        return out
