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

    @triton.jit(do_not_specialize=["step_seed"])
    def _gumbel_argmax_kernel(
        logits_ptr,
        stride,
        rows_ptr,
        temp_ptr,
        seed_ptr,
        has_seed_ptr,
        prompt_len_ptr,
        seq_lens_ptr,
        step_seed,
        max_ptr,
        idx_ptr,
        vocab,
        num_chunks,
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """argmax(logits / T + Gumbel noise) samples softmax(logits / T) exactly, in one pass and without
        normalising; T == 0 gives the plain argmax. Noise is Philox(seed, counter * vocab + token id): a seeded
        row's (seed, counter) are its own seed and output index (seq_len - prompt_len), so it draws the same
        token in any batch; the others use (step_seed, batch index). The per-row parameters are read from the
        sampler's tables by request row (rows_ptr). Each program scans one chunk of one batch entry; the chunk
        winners are reduced by _sample_finish_kernel."""
        b = tl.program_id(0)
        chunk = tl.program_id(1)
        row = tl.load(rows_ptr + b).to(tl.int64)
        t = tl.load(temp_ptr + row)
        seeded = tl.load(has_seed_ptr + row) != 0
        seed = tl.where(seeded, tl.load(seed_ptr + row).to(tl.int64), step_seed.to(tl.int64))
        own = tl.load(seq_lens_ptr + b).to(tl.int64) - tl.load(prompt_len_ptr + row).to(tl.int64)
        base = tl.where(seeded, own, b.to(tl.int64)) * vocab
        best = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int32)
        # One Philox call gives four uniforms: each iteration covers four blocks.
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, 4 * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            u0, u1, u2, u3 = tl.rand4x(seed, (base + offs).to(tl.uint32))
            best, best_idx = _race(logits_ptr + b * stride, offs, vocab, t, u0, best, best_idx)
            best, best_idx = _race(logits_ptr + b * stride, offs + BLOCK, vocab, t, u1, best, best_idx)
            best, best_idx = _race(logits_ptr + b * stride, offs + 2 * BLOCK, vocab, t, u2, best, best_idx)
            best, best_idx = _race(logits_ptr + b * stride, offs + 3 * BLOCK, vocab, t, u3, best, best_idx)
        tl.store(max_ptr + b * num_chunks + chunk, best)
        tl.store(idx_ptr + b * num_chunks + chunk, best_idx)

    @triton.jit
    def _sample_finish_kernel(
        max_ptr,
        idx_ptr,
        num_chunks,
        tokens_ptr,
        packed_ptr,
        rows_ptr,
        seq_lens_ptr,
        keep_ptr,
        req_tokens_ptr,
        req_tokens_stride,
        LAND: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per batch entry: the winner of its chunks (the first, on a tie, as torch.argmax) is its
        token, stored as int64 and as the float32 packed result (engine/step_result.py). LAND: a kept row's
        token also goes into req_tokens[row, seq_len], the next step's input (the runner's write-back)."""
        b = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < num_chunks
        best = tl.load(max_ptr + b * num_chunks + offs, mask=mask, other=float("-inf"))
        winner = tl.argmax(best, axis=0)
        token = tl.load(idx_ptr + b * num_chunks + winner)
        tl.store(tokens_ptr + b, token.to(tl.int64))
        tl.store(packed_ptr + b, token.to(tl.float32))
        if LAND:
            kept = tl.load(keep_ptr + b) != 0
            row = tl.load(rows_ptr + b).to(tl.int64)
            pos = tl.load(seq_lens_ptr + b).to(tl.int64)
            tl.store(req_tokens_ptr + row * req_tokens_stride + pos, token.to(tl.int32), mask=kept)

    @triton.jit
    def _copy_one_kernel(src_ptr, dst_ptr):
        tl.store(dst_ptr, tl.load(src_ptr))

    @triton.jit
    def _decode_prep_kernel(
        rows_ptr,
        kv_lens_ptr,
        kv_indptr_ptr,
        new_slots_ptr,
        req_to_slot_ptr,
        req_to_slot_stride,
        req_tokens_ptr,
        req_tokens_stride,
        num_rows,
        indices_ptr,
        out_slots_ptr,
        positions_ptr,
        input_ids_ptr,
        BLOCK: tl.constexpr,
    ):
        """A decode step's indices, one program per (batch entry, BLOCK of its positions): entry b (request row
        r, kv_len n) gets the new token's slot written into req_to_slot[r, n - 1], its slot list
        req_to_slot[r, :n] copied to indices[kv_indptr[b]:], and out_slot, position n - 1 and input id
        req_tokens[r, n - 1]. Entries b >= num_rows pad a CUDA graph's batch: one position at slot 0, token 0,
        their index after the real ones (indices[kv_indptr[num_rows] + b - num_rows])."""
        b = tl.program_id(0)
        blk = tl.program_id(1)
        if b < num_rows:
            row = tl.load(rows_ptr + b).to(tl.int64)
            n = tl.load(kv_lens_ptr + b).to(tl.int64)
            start = tl.load(kv_indptr_ptr + b).to(tl.int64)
            new_slot = tl.load(new_slots_ptr + b)
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            last = offs == n - 1
            slots = tl.load(req_to_slot_ptr + row * req_to_slot_stride + offs, mask=offs < n - 1, other=0)
            slots = tl.where(last, new_slot, slots)
            tl.store(indices_ptr + start + offs, slots.to(indices_ptr.dtype.element_ty), mask=offs < n)
            # Only the program whose block holds position n - 1 touches it in the table: no other reads it.
            tl.store(req_to_slot_ptr + row * req_to_slot_stride + offs, slots, mask=last)
            if blk == 0:
                tl.store(out_slots_ptr + b, new_slot.to(out_slots_ptr.dtype.element_ty))
                tl.store(positions_ptr + b, (n - 1).to(positions_ptr.dtype.element_ty))
                token = tl.load(req_tokens_ptr + row * req_tokens_stride + n - 1)
                tl.store(input_ids_ptr + b, token.to(input_ids_ptr.dtype.element_ty))
        elif blk == 0:
            total = tl.load(kv_indptr_ptr + num_rows).to(tl.int64)
            tl.store(indices_ptr + total + b - num_rows, tl.full((), 0, indices_ptr.dtype.element_ty))
            tl.store(out_slots_ptr + b, tl.full((), 0, out_slots_ptr.dtype.element_ty))
            tl.store(positions_ptr + b, tl.full((), 0, positions_ptr.dtype.element_ty))
            tl.store(input_ids_ptr + b, tl.full((), 0, input_ids_ptr.dtype.element_ty))


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


SAMPLE_BLOCK = 512  # part of the noise stream's definition: changing it changes every seeded draw


def gumbel_sample(
    logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor
) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else a draw from softmax(logits / temperature) with
    the noise of (seed, counter) per row. sample_rows with every row seeded and a prompt length of 0."""
    B, dev = logits.shape[0], logits.device
    rows = torch.arange(B, device=dev)
    seeded, zeros = torch.ones(B, dtype=torch.bool, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
    return sample_rows(logits, rows, counter, 0, temperature, seed, seeded, zeros)[0]


def _sample_chunk(B: int) -> int:
    return 8192 if B >= 32 else 2048


def sample_scratch_size(max_rows: int, vocab: int) -> int:
    """Elements of sample_rows' chunk-winner buffers that suffice for any batch of up to max_rows."""
    return max(b * -(-vocab // _sample_chunk(b)) for b in {min(max_rows, 31), max_rows})


def sample_rows(
    logits: torch.Tensor,
    rows: torch.Tensor,
    seq_lens: torch.Tensor,
    step_seed: int,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    has_seed: torch.Tensor,
    prompt_len: torch.Tensor,
    land: tuple[torch.Tensor, torch.Tensor] | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per batch entry b (request row rows[b], seq_lens[b] known tokens), its parameters read from
    the per-request-row tables (temperature, seed, has_seed, prompt_len): greedy where temperature is 0, else
    a draw from softmax(logits / temperature); seeded rows from (seed, seq_len - prompt_len), the others from
    (step_seed, b). `land` = (req_tokens, keep [B] flags): kept rows' tokens are written to
    req_tokens[row, seq_len]. `scratch`: float32 and int32 buffers, as large as each other, for the chunk
    winners (the caller's, reused step after step: see sample_scratch_size; fresh ones otherwise). `out`: a
    [B, 1] float32 tensor for the packed result, possibly pinned host memory (see writes_pinned_memory).
    Returns (tokens [B] int64, the packed result [B, 1] float32)."""
    B, V = logits.shape
    # Small batches split each row into more, shorter chunks, so that enough programs run at once (at B = 1
    # the 8192-token chunks give 19 programs for 132 multiprocessors). Multiples of 4 * SAMPLE_BLOCK only.
    chunk = _sample_chunk(B)
    n = triton.cdiv(V, chunk)
    dev = logits.device
    if scratch is not None and scratch[0].numel() >= B * n:
        best, idx = scratch  # only the kernels below touch them, in stream order: reuse is safe
    else:
        best = torch.empty((B, n), dtype=torch.float32, device=dev)
        idx = torch.empty((B, n), dtype=torch.int32, device=dev)
    tokens = torch.empty(B, dtype=torch.long, device=dev)
    packed = out if out is not None else torch.empty((B, 1), dtype=torch.float32, device=dev)
    if B:
        _gumbel_argmax_kernel[(B, n)](
            logits,
            logits.stride(0),
            rows,
            temperature,
            seed,
            has_seed,
            prompt_len,
            seq_lens,
            step_seed,
            best,
            idx,
            V,
            n,
            CHUNK=chunk,
            BLOCK=SAMPLE_BLOCK,
        )
        req_tokens, keep = land if land is not None else (tokens, tokens)
        _sample_finish_kernel[(B,)](
            best,
            idx,
            n,
            tokens,
            packed,
            rows,
            seq_lens,
            keep,
            req_tokens,
            req_tokens.stride(0),
            LAND=land is not None,
            BLOCK=max(triton.next_power_of_2(n), 16),
        )
    return tokens, packed


def writes_pinned_memory(device: torch.device) -> bool:
    """Whether a Triton kernel on `device` stores straight into pinned host memory (mapped into the device's
    address space under unified addressing), tried once: then the fused sampler writes a step's tokens where
    the host reads them, and the step needs no copy to the host. Any failure means no."""
    if triton is None or device.type != "cuda":
        return False
    try:
        with torch.cuda.device(device):
            host = torch.zeros(16, dtype=torch.float32, pin_memory=True)
            _copy_one_kernel[(1,)](torch.full((16,), 7.0, device=device), host)  # as the sampler: device -> host
            torch.cuda.synchronize(device)
        return host[0].item() == 7.0
    except Exception:  # a refused pointer, an unmapped allocation: the copy path is always right
        return False


DECODE_PREP_BLOCK = 1024


def decode_prep(
    rows: torch.Tensor,
    kv_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    new_slots: torch.Tensor,
    max_kv_len: int,
    req_to_slot: torch.Tensor,
    req_tokens: torch.Tensor,
    indices: torch.Tensor,
    out_slots: torch.Tensor,
    positions: torch.Tensor,
    input_ids: torch.Tensor,
) -> None:
    """A decode step's table write and gathers in one launch (see _decode_prep_kernel): rows, kv_lens,
    new_slots [b], kv_indptr [b + 1] on the device; out_slots, positions and input_ids have bs >= b entries
    (the rows past b pad a CUDA graph's batch) and indices kv_indptr[b] + bs - b."""
    num_rows, bs = len(rows), len(out_slots)
    grid = (bs, triton.cdiv(max(max_kv_len, 1), DECODE_PREP_BLOCK))
    _decode_prep_kernel[grid](
        rows,
        kv_lens,
        kv_indptr,
        new_slots,
        req_to_slot,
        req_to_slot.stride(0),
        req_tokens,
        req_tokens.stride(0),
        num_rows,
        indices,
        out_slots,
        positions,
        input_ids,
        BLOCK=DECODE_PREP_BLOCK,
    )
