"""Triton kernels for the small per-token operations of a decode step. Unfused, a Qwen3 layer launches
about fifty tiny kernels (norms in float32, rotary, SiLU); these do each group in one pass. They run on
CUDA tensors only; the plain-torch layers stay the reference on every other device (tests/test_gpu.py
compares the two). Importing this module needs no GPU."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, x_stride, res_ptr, w_ptr, out_ptr, n, eps, HAS_RES: tl.constexpr,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * x_stride + offs, mask=mask, other=0.0)
        if HAS_RES:
            # Round the sum to the activation dtype first, as the reference does.
            x = x + tl.load(res_ptr + row * n + offs, mask=mask, other=0.0)
            tl.store(res_ptr + row * n + offs, x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        y = (xf * inv).to(x.dtype) * w
        tl.store(out_ptr + row * n + offs, y, mask=mask)

    @triton.jit
    def _norm_rope_kernel(x_ptr, tok_stride, head_stride, w_ptr, cos_ptr, sin_ptr, cs_stride, pos_ptr, out_ptr,
                          num_heads, eps, HAS_NORM: tl.constexpr, HALF: tl.constexpr):
        tok = tl.program_id(0)
        head = tl.program_id(1)
        offs = tl.arange(0, HALF)
        base = x_ptr + tok * tok_stride + head * head_stride
        x1 = tl.load(base + offs)
        x2 = tl.load(base + HALF + offs)
        if HAS_NORM:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            inv = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF) + eps)
            x1 = (f1 * inv).to(x1.dtype) * tl.load(w_ptr + offs)
            x2 = (f2 * inv).to(x2.dtype) * tl.load(w_ptr + HALF + offs)
        pos = tl.load(pos_ptr + tok)
        cos = tl.load(cos_ptr + pos * cs_stride + offs)
        sin = tl.load(sin_ptr + pos * cs_stride + offs)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        out = out_ptr + (tok * num_heads + head) * 2 * HALF
        tl.store(out + offs, (a * cos - b * sin).to(x1.dtype))
        tl.store(out + HALF + offs, (b * cos + a * sin).to(x1.dtype))

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < n
        gate = tl.load(x_ptr + row * 2 * n + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * n + n + col, mask=mask, other=0.0)
        y = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
        tl.store(out_ptr + row * n + col, y, mask=mask)

    @triton.jit
    def _race(row_ptr, offs, vocab, t, u, best, best_idx):
        """Folds one block into the running (best score, index): Gumbel noise via fast base-2 logarithms."""
        mask = offs < vocab
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        ln2 = 0.6931471805599453
        gumbel = -ln2 * tl.log2(-ln2 * tl.log2(tl.maximum(u, 1e-10)))
        score = tl.where(t > 0, x / tl.maximum(t, 1e-6) + gumbel, x)
        score = tl.where(mask, score, float("-inf"))
        m = tl.max(score, axis=0)
        i = tl.argmax(score, axis=0).to(tl.int32) + tl.min(offs, axis=0)
        take = m > best
        return tl.where(take, m, best), tl.where(take, i, best_idx)

    @triton.jit
    def _gumbel_argmax_kernel(logits_ptr, stride, temp_ptr, seed_ptr, counter_ptr, max_ptr, idx_ptr, vocab,
                              num_chunks, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        """argmax(logits / T + Gumbel noise) samples softmax(logits / T) exactly, in one pass and without
        normalising; T == 0 gives the plain argmax. Noise is Philox(seed, counter * vocab + token id). Each
        program scans one chunk of one row; the chunk winners are reduced afterwards."""
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        t = tl.load(temp_ptr + row)
        seed = tl.load(seed_ptr + row)
        base = tl.load(counter_ptr + row) * vocab
        best = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int32)
        # One Philox call gives four uniforms: each iteration covers four blocks.
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, 4 * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            u0, u1, u2, u3 = tl.rand4x(seed, (base + offs).to(tl.uint32))
            best, best_idx = _race(logits_ptr + row * stride, offs, vocab, t, u0, best, best_idx)
            best, best_idx = _race(logits_ptr + row * stride, offs + BLOCK, vocab, t, u1, best, best_idx)
            best, best_idx = _race(logits_ptr + row * stride, offs + 2 * BLOCK, vocab, t, u2, best, best_idx)
            best, best_idx = _race(logits_ptr + row * stride, offs + 3 * BLOCK, vocab, t, u3, best, best_idx)
        tl.store(max_ptr + row * num_chunks + chunk, best)
        tl.store(idx_ptr + row * num_chunks + chunk, best_idx)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row; with `residual`, first adds it to x and stores the sum back into `residual`."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](x2, x2.stride(0), residual if residual is not None else x2, weight, out, n,
                                        eps, HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n))
    return out.view(x.shape)


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm (when `weight` is given) then neox-style rotary, from a strided [T, heads, D] view into
    a new contiguous tensor."""
    T, H, D = x.shape
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T:
        _norm_rope_kernel[(T, H)](x, x.stride(0), x.stride(1), weight if weight is not None else x, cos, sin,
                                  cos.stride(0), positions, out, H, eps, HAS_NORM=weight is not None, HALF=D // 2)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, n, BLOCK=block)
    return out.view(*x.shape[:-1], n)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                  counter: torch.Tensor) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else a draw from softmax(logits / temperature)."""
    B, V = logits.shape
    chunk = 8192
    n = triton.cdiv(V, chunk)
    best = torch.empty((B, n), dtype=torch.float32, device=logits.device)
    idx = torch.empty((B, n), dtype=torch.int32, device=logits.device)
    if B:
        _gumbel_argmax_kernel[(B, n)](logits, logits.stride(0), temperature, seed, counter, best, idx, V, n,
                                      CHUNK=chunk, BLOCK=2048)
    return idx.gather(1, best.argmax(1, keepdim=True)).squeeze(1).long()
