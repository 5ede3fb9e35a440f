"""Triton kernel of a decode step's input preparation (`decode_prep`): the new token's slot written into the
request-to-slot table, each row's slot list, out slot, position and input id gathered, straight into the CUDA
graph's static buffers when the step replays one.

Why: the general preparation (engine/runner/inputs.py) is some twenty eager torch ops, each 5-15 us of host
time, and a batch-1 decode step is host-bound; this is one launch. CUDA only; the torch path stays the
reference (the GPU tests compare the two). Importing this module needs no GPU."""

from __future__ import annotations

import torch

from ringllm.engine.kernels import tl, triton

if triton is not None:

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
