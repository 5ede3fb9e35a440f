"""Triton kernels of a decoder layer's small per-token operations at decode time: add + RMSNorm, per-head
norm + rotary (`norm_rope`), the same fused with the K/V store into the cache slot (`qkv_rope_store`, for
backends that offer a `kv_store_target`: FlashInfer), SiLU-and-mul, and a skinny GEMM for few rows
(`linear`).

Why: unfused, a Qwen3 layer launches about fifty tiny kernels (norms in float32, rotary, SiLU), and at small
batch a decode step is launch- and host-bound; these do each group in one pass. The skinny GEMM exists because
cuBLAS's tiles for large M leave the memory system idle on deep narrow weights at M <= 16 (measured in
linear's docstring). They run on CUDA tensors only; the plain-torch layers (engine/models/layers.py) stay the
reference on every other device, and the GPU tests compare the two. Importing this module needs no GPU."""

from __future__ import annotations

import torch

from ringllm.engine.kernels import tl, triton

if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, x_stride, res_ptr, w_ptr, out_ptr, n, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
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
    def _norm_rope_kernel(
        x_ptr,
        tok_stride,
        head_stride,
        w_ptr,
        cos_ptr,
        sin_ptr,
        cs_stride,
        pos_ptr,
        out_ptr,
        num_heads,
        eps,
        HAS_NORM: tl.constexpr,
        HALF: tl.constexpr,
    ):
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
    def _qkv_rope_store_kernel(
        qkv_ptr,
        tok_stride,
        qw_ptr,
        kw_ptr,
        cos_ptr,
        sin_ptr,
        cs_stride,
        pos_ptr,
        slot_ptr,
        q_out_ptr,
        k_cache_ptr,
        v_cache_ptr,
        num_heads,
        num_kv_heads,
        eps,
        HAS_NORM: tl.constexpr,
        HALF: tl.constexpr,
        KV_FP8: tl.constexpr,
    ):
        """One program per (token, head) over the fused q|k|v projection: a query head is normed, rotated and
        written to q_out; a KV head's key is normed, rotated and its value copied, both straight into the
        token's slot of the layer's K/V cache. Replaces two norm+rotary launches and two cache scatters.
        KV_FP8: the cache is float8 e4m3; K/V are rounded to the model's dtype first, as the torch store
        rounds them, then clamped to +-448 (a bare cast of a larger value is not guaranteed to saturate)."""
        tok = tl.program_id(0)
        head = tl.program_id(1)
        D: tl.constexpr = 2 * HALF
        offs = tl.arange(0, HALF)
        is_q = head < num_heads
        kv_head = head - num_heads
        base = qkv_ptr + tok * tok_stride + head * D
        x1 = tl.load(base + offs)
        x2 = tl.load(base + HALF + offs)
        if HAS_NORM:
            if is_q:
                w1, w2 = tl.load(qw_ptr + offs), tl.load(qw_ptr + HALF + offs)
            else:
                w1, w2 = tl.load(kw_ptr + offs), tl.load(kw_ptr + HALF + offs)
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            inv = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / D + eps)
            x1 = (f1 * inv).to(x1.dtype) * w1
            x2 = (f2 * inv).to(x2.dtype) * w2
        pos = tl.load(pos_ptr + tok)
        cos = tl.load(cos_ptr + pos * cs_stride + offs)
        sin = tl.load(sin_ptr + pos * cs_stride + offs)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        r1, r2 = (a * cos - b * sin).to(x1.dtype), (b * cos + a * sin).to(x1.dtype)
        if is_q:
            out = q_out_ptr + (tok * num_heads + head) * D
            tl.store(out + offs, r1)
            tl.store(out + HALF + offs, r2)
        else:
            slot = tl.load(slot_ptr + tok).to(tl.int64)
            row = (slot * num_kv_heads + kv_head) * D
            v = base + num_kv_heads * D
            v1, v2 = tl.load(v + offs), tl.load(v + HALF + offs)
            # Triton forbids a branch re-typing a variable, so the fp8 values get names of their own.
            if KV_FP8:
                kv_ty = k_cache_ptr.dtype.element_ty
                tl.store(k_cache_ptr + row + offs, tl.clamp(r1.to(tl.float32), -448.0, 448.0).to(kv_ty))
                tl.store(k_cache_ptr + row + HALF + offs, tl.clamp(r2.to(tl.float32), -448.0, 448.0).to(kv_ty))
                tl.store(v_cache_ptr + row + offs, tl.clamp(v1.to(tl.float32), -448.0, 448.0).to(kv_ty))
                tl.store(v_cache_ptr + row + HALF + offs, tl.clamp(v2.to(tl.float32), -448.0, 448.0).to(kv_ty))
            else:
                tl.store(k_cache_ptr + row + offs, r1)
                tl.store(k_cache_ptr + row + HALF + offs, r2)
                tl.store(v_cache_ptr + row + offs, v1)
                tl.store(v_cache_ptr + row + HALF + offs, v2)

    @triton.jit
    def _skinny_gemm_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        M,
        N,
        K,
        x_stride,
        w_stride,
        y_stride,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """y = x W^T for few rows (decode at small batch): each program streams a BLOCK_N-row strip of W once
        for every row of x. Narrow strips give enough programs to keep the memory system busy, which cuBLAS's
        tiles for large M do not at M <= 16."""
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_rows = x_ptr + offs_m[:, None] * x_stride
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * w_stride
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_rows + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        y = y_ptr + offs_m[:, None] * y_stride + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = col < n
        gate = tl.load(x_ptr + row * 2 * n + col, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * n + n + col, mask=mask, other=0.0)
        y = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
        tl.store(out_ptr + row * n + col, y, mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of each row; with `residual`, first adds it to x and stores the sum back into `residual`."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rmsnorm_kernel[(x2.shape[0],)](
            x2,
            x2.stride(0),
            residual if residual is not None else x2,
            weight,
            out,
            n,
            eps,
            HAS_RES=residual is not None,
            BLOCK=triton.next_power_of_2(n),
        )
    return out.view(x.shape)


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """Per-head RMSNorm (when `weight` is given) then neox-style rotary, from a strided [T, heads, D] view into
    a new contiguous tensor."""
    T, H, D = x.shape
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T:
        _norm_rope_kernel[(T, H)](
            x,
            x.stride(0),
            x.stride(1),
            weight if weight is not None else x,
            cos,
            sin,
            cos.stride(0),
            positions,
            out,
            H,
            eps,
            HAS_NORM=weight is not None,
            HALF=D // 2,
        )
    return out


def qkv_rope_store(
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_weight,
    k_weight,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """From the q|k|v projection [T, (H + 2 Hkv) D]: per-head RMSNorm (weights given) and neox rotary of q and
    k; k and v are stored into `slots` of the layer's caches ([slots, Hkv, D], contiguous; the model's dtype
    or float8_e4m3fn, clamped as engine/kv_cache.py's store does). Returns q as a new [T, H, D] tensor."""
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    if not kv_fp8 and k_cache.dtype != qkv.dtype:
        raise ValueError(f"qkv_rope_store: a {k_cache.dtype} cache for {qkv.dtype} activations")
    T = qkv.shape[0]
    q = torch.empty((T, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if T:
        has_norm = q_weight is not None
        _qkv_rope_store_kernel[(T, num_heads + num_kv_heads)](
            qkv,
            qkv.stride(0),
            q_weight if has_norm else qkv,
            k_weight if has_norm else qkv,
            cos,
            sin,
            cos.stride(0),
            positions,
            slots,
            q,
            k_cache,
            v_cache,
            num_heads,
            num_kv_heads,
            eps,
            HAS_NORM=has_norm,
            HALF=head_dim // 2,
            KV_FP8=kv_fp8,
        )
    return q


SKINNY_MAX_M = 16  # rows up to which the skinny kernel is used


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """F.linear, through the skinny kernel when x (bf16/fp16: the kernel's float32 dot would run in tf32) has
    at most SKINNY_MAX_M rows and the weight is no wider than it is deep (N <= K: o_proj, down_proj). Measured on an H200 (scripts/gpu_kernels_bench.py, Qwen3-0.6B
    shapes, 28 layers): o_proj at M = 1 363 -> 145 us per step, down_proj 189 -> 178; for the wide weights
    (q|k|v, gate|up, lm_head) it only tied cuBLAS, so they stay there. `config` forces the kernel with
    (BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = weight.shape[0]
    fits = M <= SKINNY_MAX_M and (config is not None or N <= K) and x.dtype in (torch.bfloat16, torch.float16)
    if not fits or bias is not None or M == 0 or x2.stride(-1) != 1 or weight.stride(-1) != 1:
        return torch.nn.functional.linear(x, weight, bias)
    block_n, block_k, warps, stages = config or (16, 512, 4, 3)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _skinny_gemm_kernel[(triton.cdiv(N, block_n),)](
        x2,
        weight,
        y,
        M,
        N,
        K,
        x2.stride(0),
        weight.stride(0),
        y.stride(0),
        BLOCK_M=16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        num_stages=stages,
    )
    return y.view(*x.shape[:-1], N)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = 1024
    if x2.shape[0]:
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, out, n, BLOCK=block)
    return out.view(*x.shape[:-1], n)
