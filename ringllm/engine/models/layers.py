"""Layers shared by every model family: embedding, merged linears, RMSNorm, rotary, SiLU-and-mul, attention,
and the decoder block they make up. Numerics follow Hugging Face's reference implementations so that greedy
tokens match in float32. Linears and the embedding are tensor-parallel (Megatron style: column-parallel in,
row-parallel out, one all-reduce per block); with tp = 1 they are plain layers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ringllm.engine import parallel
from ringllm.engine.kernels import available
from ringllm.engine.kernels import layers as kernels
from ringllm.engine.parallel import Layout

if TYPE_CHECKING:
    from ringllm.engine.models.decoder import ModelShape


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`, adds it first and returns (normed, new residual): the fused residual-add form."""
        if available(x):
            out = kernels.rmsnorm(x, self.weight, self.eps, residual)  # updates residual in place
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


def deep_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """o_proj and down_proj are the deep, narrow weights where cuBLAS is slow at decode batch sizes: on CUDA they
    go through the skinny kernel where it pays (kernels.layers.linear)."""
    return kernels.linear(x, weight, bias) if available(x) else F.linear(x, weight, bias)


class MergedLinear(nn.Module):
    """One matmul for several projections stored side by side (q|k|v or gate|up), column-parallel: each part
    keeps only this tensor rank's rows. Checkpoints store the parts separately; `load_part` reads one part's
    shard (from `part_offsets`, a row offset into the checkpoint tensor) into its rows. `linear` computes it
    (deterministic mode replaces it: DecoderForCausalLM)."""

    linear: Callable[..., torch.Tensor] = staticmethod(F.linear)

    def __init__(self, in_features: int, part_sizes: list[int], part_offsets: list[int], bias: bool):
        super().__init__()
        self.part_sizes, self.part_offsets = part_sizes, part_offsets
        self.weight = nn.Parameter(torch.empty(sum(part_sizes), in_features))
        self.bias = nn.Parameter(torch.zeros(sum(part_sizes))) if bias else None

    def load_part(self, name: str, index: int, tensor) -> None:
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"a checkpoint tensor {name!r} for a linear that has no bias")
        start, size, off = sum(self.part_sizes[:index]), self.part_sizes[index], self.part_offsets[index]
        param.data[start : start + size].copy_(tensor[off : off + size])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split across tensor ranks: each rank multiplies its slice of x and the
    partial sums are all-reduced. `linear` computes the local product (as MergedLinear's)."""

    linear: Callable[..., torch.Tensor] = staticmethod(deep_linear)

    def __init__(self, in_features: int, out_features: int, tp: Layout):
        super().__init__()
        self.in_local = in_features // tp.tp_size
        self.offset = tp.tp_rank * self.in_local
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))

    def load(self, tensor) -> None:
        self.weight.data.copy_(tensor[:, self.offset : self.offset + self.in_local])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel.tp_all_reduce(self.linear(x, self.weight))


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by rows (vocabulary ids) across tensor ranks, padded to a multiple of tp. A
    rank embeds the ids it holds, zeros the rest, and the all-reduce assembles every row. The same shard is the
    tied LM head's."""

    def __init__(self, vocab_size: int, hidden: int, tp: Layout):
        super().__init__()
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // tp.tp_size)
        self.start = tp.tp_rank * self.per_rank
        self.sharded = tp.tp_size > 1
        self.weight = nn.Parameter(torch.zeros(self.per_rank, hidden))

    def load(self, tensor) -> None:
        end = min(self.start + self.per_rank, self.vocab_size)
        self.weight.data[: end - self.start].copy_(tensor[self.start : end])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return parallel.tp_all_reduce(out)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if available(x):
        return kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies, with Llama 3's long-context scaling when the checkpoint asks for it."""
    theta = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"rope scaling {kind!r} is not supported (default and llama3 are)")
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_ctx = rope["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Rotate-half rotary embedding over a cos/sin table computed once for every position."""

    cos: torch.Tensor  # [max_positions, head_dim] buffers (not saved with the weights)
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, rope: dict):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, rope)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def eps_of(norm: RMSNorm | None) -> float:
        return norm.eps if norm is not None else 0.0

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelShape, tp: Layout):
        super().__init__()
        self.layer_id = layer_id  # index into this stage's KV pool
        first_kv, self.num_kv_heads = tp.kv_heads(cfg.num_kv_heads)
        self.num_heads, self.head_dim = cfg.num_heads // tp.tp_size, cfg.head_dim
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size,
            [q, kv, kv],
            [tp.tp_rank * q, first_kv * self.head_dim, first_kv * self.head_dim],
            bias=cfg.qkv_bias,
        )
        self.o_proj = RowParallelLinear(cfg.num_heads * self.head_dim, cfg.hidden_size, tp)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        assert cfg.rotary is not None, "the model sets shape.rotary before building its layers"
        self.rotary = cfg.rotary

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv = self.qkv_proj(x)
        target = attn.kv_store_target(self.layer_id) if available(x) else None
        if target is not None:  # one kernel: q/k norm, rotary, and K/V written straight into the cache
            r = self.rotary
            q = kernels.qkv_rope_store(
                qkv,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                self.q_norm.weight if self.q_norm else None,
                self.k_norm.weight if self.k_norm else None,
                r.eps_of(self.q_norm),
                r.cos,
                r.sin,
                positions,
                target[2],
                target[0],
                target[1],
            )
            return self.o_proj(attn.attend(self.layer_id, q).reshape(-1, q_size))
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if available(x):  # per-head norm and rotary in one pass each
            r = self.rotary
            q = kernels.norm_rope(
                q, self.q_norm.weight if self.q_norm else None, r.eps_of(self.q_norm), r.cos, r.sin, positions
            )
            k = kernels.norm_rope(
                k, self.k_norm.weight if self.k_norm else None, r.eps_of(self.k_norm), r.cos, r.sin, positions
            )
            return self.o_proj(attn.forward(self.layer_id, q, k, v).reshape(-1, q_size))
        if self.q_norm is not None and self.k_norm is not None:  # both or neither (qk_norm)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = attn.forward(self.layer_id, q, k, v)
        return self.o_proj(out.reshape(-1, q_size))


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, tp: Layout):
        super().__init__()
        local = intermediate // tp.tp_size
        offset = tp.tp_rank * local
        self.gate_up_proj = MergedLinear(hidden, [local, local], [offset, offset], bias=False)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelShape, tp: Layout):
        super().__init__()
        self.self_attn = Attention(layer_id, cfg, tp)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, attn):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, attn)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual
