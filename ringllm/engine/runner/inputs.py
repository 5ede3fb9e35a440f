"""A step's inputs on the device, from its StepPlan: the plan's writes into the request tables, the rows,
lengths, positions and input ids of the step, and the attention metadata (slot indices gathered on the device
from the request-to-slot table; cascade groups where they pay).

Two paths. The general one sends the host arrays in one copy and gathers with torch ops. A plain decode step
on CUDA (the scheduler's bulk placement: one new slot per row, at its position) is prepared by one kernel
(kernels.decode_prep), straight into the CUDA graph's static buffers when the step replays one: a batch-1 step
is host-bound, and each eager torch op costs the host 5-15 us. The index arrays reach the device through a ring
of pinned buffers (staging.py), nothing allocated per step on that path."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np
import torch

from ringllm.engine.attention import AttentionBackend, AttentionMetadata
from ringllm.engine.attention.cascade import CascadeMetadata, plan_cascade
from ringllm.engine.core import cascade
from ringllm.engine.core.plan import StepPlan
from ringllm.engine.kernels import triton
from ringllm.engine.kernels.decode_prep import decode_prep
from ringllm.engine.runner.staging import StagingRing

if TYPE_CHECKING:
    from ringllm.engine.runner.cuda_graph import DecodeGraphs

STAGING_BUFFERS = 4  # steps whose index arrays are in pinned buffers at once (staging.py)


@dataclass
class StepIndices:
    """A step's index tensors on the device. The general path gathers them with torch ops; a decode step on
    CUDA gets them from one kernel (decode_prep), written straight into the CUDA graph's static buffers when the
    step replays a graph (`in_graph`)."""

    rows: torch.Tensor  # [B] request row of each sequence
    positions: torch.Tensor  # [T] position of each new token
    input_ids: torch.Tensor | None  # [T] int64 token of each new token (gathered on the first stage only)
    seq_lens: torch.Tensor  # [B] known tokens once this step is computed (where a sampled token goes)
    keep: torch.Tensor  # indices of the sequences whose sampled token is kept
    keep_flags: torch.Tensor  # [B] 1 where kept
    in_graph: bool = False


class StepInputs:
    """Prepares each step's inputs over the runner's request tables (`req_to_slot`, `req_tokens`)."""

    def __init__(
        self,
        req_to_slot: torch.Tensor,
        req_tokens: torch.Tensor,
        attn: AttentionBackend,
        graphs: DecodeGraphs | None,
        first_stage: bool,
        staging_bytes: int,
    ):
        self.device = req_to_slot.device
        self.req_to_slot, self.req_tokens = req_to_slot, req_tokens
        self.attn, self.graphs, self.first_stage = attn, graphs, first_stage
        cuda = self.device.type == "cuda"
        self.staging = StagingRing(self.device, STAGING_BUFFERS, staging_bytes) if cuda else None

    def prepare(self, plan: StepPlan) -> tuple[AttentionMetadata, StepIndices]:
        """Everything index-like for the step: the plan's table writes, then the step's rows, lengths,
        positions, input ids and attention indices, on the device (a decode step through decode_prep where it
        fits, else the general path)."""
        if self.fits_decode_kernel(plan):
            return self._prepare_decode(plan)
        return self._prepare_general(plan)

    def _prepare_general(self, plan: StepPlan) -> tuple[AttentionMetadata, StepIndices]:
        """The general path: one copy of the host arrays, then the gathers as torch ops on the device."""
        lens, starts = plan.lens.astype(np.int64), plan.starts.astype(np.int64)
        kv_lens = starts + lens
        qo_indptr = np.concatenate([[0], np.cumsum(lens)])
        kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)])
        T = int(qo_indptr[-1])
        row_of_token = np.repeat(plan.rows, lens)
        positions = np.arange(T) - np.repeat(qo_indptr[:-1], lens) + np.repeat(starts, lens)
        parts = [
            plan.slot_rows,
            plan.slot_pos,
            plan.slot_ids,
            plan.token_rows,
            plan.token_pos,
            plan.token_ids,
            plan.rows,
            kv_lens,
            qo_indptr,
            kv_indptr,
            row_of_token,
            positions,
            np.flatnonzero(plan.sample),
            plan.sample,
        ]
        (
            slot_rows,
            slot_pos,
            slot_ids,
            tok_rows,
            tok_pos,
            tok_ids,
            rows,
            seq_lens,
            qo_d,
            kv_d,
            row_of_token_d,
            positions_d,
            keep,
            keep_flags,
        ) = self._to_device(parts, np.int64)
        if len(slot_ids):
            self.req_to_slot[slot_rows, slot_pos] = slot_ids.int()
        if len(tok_ids):
            self.req_tokens[tok_rows, tok_pos] = tok_ids.int()
        total_kv = int(kv_indptr[-1])
        kv_rows = torch.repeat_interleave(rows, seq_lens, output_size=total_kv)
        kv_pos = torch.arange(total_kv, device=self.device) - torch.repeat_interleave(
            kv_d[:-1], seq_lens, output_size=total_kv
        )
        kv_indices = self.req_to_slot[kv_rows, kv_pos]
        out_slots = self.req_to_slot[row_of_token_d, positions_d]
        meta = AttentionMetadata(
            qo_indptr, kv_indptr, kv_lens, plan.is_decode, qo_d.int(), kv_d.int(), kv_indices, out_slots
        )
        meta.cascade = self.cascade_for(plan, kv_lens)
        input_ids = self.req_tokens[row_of_token_d, positions_d].long() if self.first_stage else None
        return meta, StepIndices(rows, positions_d, input_ids, seq_lens, keep, keep_flags)

    def _to_device(self, parts: list[np.ndarray], dtype) -> list[torch.Tensor]:
        """The parts as `dtype` tensors on the device, sent in one copy. Each starts 16 bytes aligned: Triton
        specializes a kernel on its pointers' alignment, so views at odd offsets would compile variants."""
        per = 16 // np.dtype(dtype).itemsize
        sizes = [len(x) for x in parts]
        starts = [0, *accumulate(-(-n // per) * per for n in sizes)]
        packed = self.staging.send(parts, starts, dtype) if self.staging is not None else None
        if packed is None:
            host = np.zeros(starts[-1], dtype=dtype)
            for x, a, n in zip(parts, starts, sizes):
                host[a : a + n] = x
            packed = torch.from_numpy(host)
            if self.device.type == "cuda":
                packed = packed.pin_memory().to(self.device, non_blocking=True)
        return [packed[a : a + n] for a, n in zip(starts, sizes)]

    def fits_decode_kernel(self, plan: StepPlan) -> bool:
        """A CUDA decode step whose only slot writes are each sequence's new position (a plain batch of
        decodes, as the scheduler places them): decode_prep does its table write and gathers."""
        B = len(plan.rows)
        return (
            self.device.type == "cuda"
            and triton is not None
            and B > 0
            and plan.is_decode
            and len(plan.slot_ids) == B
            # the scheduler's bulk-placed decodes share these arrays (a worker's decoded plan does not)
            and (plan.slot_rows is plan.rows or np.array_equal(plan.slot_rows, plan.rows))
            and (plan.slot_pos is plan.starts or np.array_equal(plan.slot_pos, plan.starts))
        )

    def _prepare_decode(self, plan: StepPlan) -> tuple[AttentionMetadata, StepIndices]:
        """`prepare` for a decode step, in one small copy and one kernel launch instead of some twenty torch
        ops: the new slots go into req_to_slot and the slot lists, out slots, positions and input ids are
        gathered by decode_prep, into the CUDA graph's static buffers when the step replays one."""
        B = len(plan.rows)
        kv_lens = plan.starts.astype(np.int64) + 1
        kv_indptr = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(kv_lens, out=kv_indptr[1:])
        qo_indptr = np.arange(B + 1)
        parts = [plan.rows, kv_lens, kv_indptr, qo_indptr, plan.slot_ids, plan.sample, np.flatnonzero(plan.sample)]
        # tokens known on the host (a parallel engine's landing, recomputes); nearly every step has none
        has_tokens = len(plan.token_ids) > 0
        if has_tokens:
            parts += [plan.token_rows, plan.token_pos, plan.token_ids]
        # int32 throughout: rows, slots, positions and token ids all fit, and attention takes int32 indptrs.
        sent = self._to_device(parts, np.int32)
        rows, seq_lens, kv_d, qo_d, new_slots, keep_flags, keep = sent[:7]
        if has_tokens:  # before the gather of the input ids
            tok_rows, tok_pos, tok_ids = sent[7:]
            self.req_tokens[tok_rows, tok_pos] = tok_ids
        n = int(kv_indptr[-1])
        g = self.graphs
        bs = g.bucket_for(B) if g is not None else None
        if g is not None and bs is not None:
            indices, out_slots, positions, input_ids = g.indices, g.out_slots[:bs], g.positions[:bs], g.input_ids[:bs]
        else:
            indices = torch.empty(n, dtype=torch.int32, device=self.device)
            out_slots = torch.empty(B, dtype=torch.int32, device=self.device)
            positions = torch.empty(B, dtype=torch.long, device=self.device)
            input_ids = torch.empty(B, dtype=torch.long, device=self.device)
        tables = (self.req_to_slot, self.req_tokens)
        outputs = (indices, out_slots, positions, input_ids)
        decode_prep(rows, seq_lens, kv_d, new_slots, int(kv_lens.max()), *tables, *outputs)
        meta = AttentionMetadata(qo_indptr, kv_indptr, kv_lens, True, qo_d, kv_d, indices[:n], out_slots[:B])
        meta.cascade = self.cascade_for(plan, kv_lens)
        ix = StepIndices(rows, positions[:B], input_ids[:B], seq_lens, keep, keep_flags, in_graph=bs is not None)
        return meta, ix

    def cascade_for(self, plan: StepPlan, kv_lens: np.ndarray) -> CascadeMetadata | None:
        """Shared-prefix attention indices for a decode step whose rows the scheduler grouped, where the backend
        runs cascade and it pays (engine/core/cascade.py); None otherwise."""
        if not (self.attn.supports_cascade and plan.is_decode and len(plan.shared_lens)):
            return None
        B, g = len(plan.rows), self.graphs
        in_graph = g is not None and g.bucket_for(B) is not None
        # A plain graph beats an eager cascade step (host-bound: two more kernels a layer, all launched), so a
        # step that fits a graph runs cascade only where its bucket has a cascade graph.
        if g is not None and in_graph and not g.has_cascade_graph(B):
            return None
        groups = cascade.worth_cascading(plan.shared_indptr, plan.shared_lens, in_graph)
        return None if groups is None else plan_cascade(plan.rows, kv_lens, *groups, self.req_to_slot)
