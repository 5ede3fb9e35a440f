"""Triton kernels of sampling: one-pass Gumbel-max over a whole batch (`sample_rows`, and `gumbel_sample` over
given per-row values), and the probe of whether a kernel can store into pinned host memory
(`writes_pinned_memory`).

Why: argmax(logits / T + Gumbel noise) samples softmax(logits / T) exactly without normalising, so a row
without top-k/top-p/min-p/penalties/bias needs one read of its logits (engine/sampler/ decides which rows
those are). The kernel reads each row's parameters from the sampler's per-request-row tables itself (no
per-step gathers: a batch-1 decode step is host-bound), writes the kept tokens back into the request-token
table (the next step's input, before the host has read them: overlap) and packs them for the host; where
kernels can store into pinned host memory, straight into the host's buffer (no copy). CUDA only; the sampler's
torch path is the reference. Importing this module needs no GPU."""

from __future__ import annotations

import torch

from ringllm.engine.kernels import tl, triton

if triton is not None:

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


def sample_chunk(B: int) -> int:
    """Logits each program of sample_rows scans at batch size B."""
    return 8192 if B >= 32 else 2048


def sample_scratch_size(max_rows: int, vocab: int) -> int:
    """Elements of sample_rows' chunk-winner buffers that suffice for any batch of up to max_rows."""
    return max(b * -(-vocab // sample_chunk(b)) for b in {min(max_rows, 31), max_rows})


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
    chunk = sample_chunk(B)
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
