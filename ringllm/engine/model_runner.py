"""Owns the model, the KV pool and the device-side request tables, and runs one StepPlan at a time.

The request tables live on the device: `req_to_slot[row, pos]` (where each position's K/V is) and
`req_tokens[row, pos]` (the token at each position). A step's input ids, positions and attention indices are
gathered from them on the device, and each sampled token is written straight back into `req_tokens`, so the
next step can run before the host has read it (overlap).

Its collaborators: the model (engine/models), the KV pool and its sizing (engine/kv_cache.py), the attention
backend (engine/attention, which declares whether CUDA graphs can run it: engine/cuda_graph.py), the sampler
(engine/sampler.py), the packing of a step's result and its copy to the host (engine/step_result.py), and the
collectives and token landing of a parallel engine (engine/parallel.py)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ringllm.engine import kernels, parallel
from ringllm.engine.attention import AttentionMetadata, make_backend
from ringllm.engine.attention.cascade import CascadeMetadata, plan_cascade
from ringllm.engine.config import EngineConfig
from ringllm.engine.core import cascade
from ringllm.engine.core.plan import StepPlan
from ringllm.engine.kernels import decode_prep, sampling
from ringllm.engine.kv_cache import KVPool, kv_cache_dtype, kv_pool_slots, peak_bytes
from ringllm.engine.loader import load_weights, pick_dtype
from ringllm.engine.logs import get_logger
from ringllm.engine.models import model_class
from ringllm.engine.parallel import MAX_PENDING_SENDS, Layout, TokenBroadcasts, TokenLanding
from ringllm.engine.sampler import GrammarMask, Sampler
from ringllm.engine.staging import StagingRing
from ringllm.engine.step_result import (
    ResultRing,
    StepResult,
    copy_to_host,
    pack_prompt_rows,
    pack_sample,
    packed_width,
    prompt_logprob_positions,
)

if TYPE_CHECKING:
    from ringllm.engine.cuda_graph import DecodeGraphs

log = get_logger("engine.runner")
STAGING_BUFFERS = 4  # steps whose index arrays are in pinned buffers at once (engine/staging.py)
RING_TOP_LOGPROBS = 20  # a result with up to this many top logprobs a row fits a ResultRing buffer


@dataclass
class _PromptPositions:
    """A step's positions whose prompt logprobs were asked for: request row, position, index among the
    step's tokens."""

    rows: np.ndarray
    pos: np.ndarray
    token_index: np.ndarray


@dataclass
class _StepIndices:
    """A step's index tensors on the device, from `_prepare`. The general path gathers them with torch ops;
    a decode step on CUDA gets them from one kernel (kernels.decode_prep), written straight into the CUDA
    graph's static buffers when the step replays a graph (`in_graph`)."""

    rows: torch.Tensor  # [B] request row of each sequence
    positions: torch.Tensor  # [T] position of each new token
    input_ids: torch.Tensor | None  # [T] int64 token of each new token (gathered on the first stage only)
    seq_lens: torch.Tensor  # [B] known tokens once this step is computed (where a sampled token goes)
    keep: torch.Tensor  # indices of the sequences whose sampled token is kept
    keep_flags: torch.Tensor  # [B] 1 where kept
    in_graph: bool = False


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_path: Path,
        hf_config: dict,
        device: torch.device,
        layout: Layout | None = None,
    ):
        self.config = config
        self.device = device
        self.layout = lay = layout or Layout()
        self.dtype = pick_dtype(config.dtype, hf_config, device)
        cls = model_class(hf_config)
        self.shape = cls.read_shape(hf_config)
        self.context_len = config.context_len or self.shape.max_position_embeddings
        torch.manual_seed(config.seed)
        with torch.device(device):
            self.model = cls(self.shape, max_positions=self.context_len + 1, layout=lay)
        load_weights(self.model, model_path)
        self.model.to(dtype=self.dtype).eval()
        self.model.rotary.cos, self.model.rotary.sin = self.model.rotary.cos.float(), self.model.rotary.sin.float()
        attn0 = self.model.layers[0].self_attn
        self.num_layers, self.num_heads, self.num_kv_heads = len(self.model.layers), attn0.num_heads, attn0.num_kv_heads
        # Pipeline stages work on different micro-batches at once: each gets up to max_bs rows of its own.
        self.max_rows = config.max_bs * lay.pp_size
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        per_token = KVPool.bytes_per_token(self.num_layers, self.num_kv_heads, self.shape.head_dim, self.kv_dtype)
        slots = kv_pool_slots(config, per_token, device, self._profile_activation_bytes)
        self.num_slots = parallel.all_ranks_min(slots, device)  # every rank holds every slot
        self.pool = KVPool(
            self.num_layers, self.num_slots, self.num_kv_heads, self.shape.head_dim, self.dtype, device, self.kv_dtype
        )
        self.attn = make_backend(config.attention_backend, device, self.pool, self.num_heads, self.shape.head_dim)
        self.req_to_slot = torch.zeros(self.max_rows, self.context_len + 1, dtype=torch.int32, device=device)
        self.req_tokens = torch.zeros(self.max_rows, self.context_len + 2, dtype=torch.int32, device=device)
        self.sampler = Sampler(self.max_rows, self.shape.vocab_size, device, config.seed) if lay.is_sampler else None
        self.row_logprobs = np.full(self.max_rows, -1, dtype=np.int64)  # sizes each step's packed result
        self.row_prompt_logprobs = np.full(self.max_rows, -1, dtype=np.int64)
        self.row_prompt_len = np.zeros(self.max_rows, dtype=np.int64)
        self.num_prompt_logprob_rows = 0
        self.num_logprob_rows = 0
        # Tokens travel from the sampler to the ranks that embed or report them (a parallel engine only).
        self.landing = TokenLanding(self.req_tokens) if lay.receives_tokens else None
        self.broadcasts = TokenBroadcasts() if lay.is_sampler and lay.world_size > 1 else None
        self._sends: deque = deque()  # (work, tensors) of stage-to-stage sends still in flight
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Pinned buffers reused step after step for the index arrays going in and the results coming out
        # (engine/staging.py, engine/step_result.py ResultRing): up to pp_size steps are in flight.
        self.staging = self.results = None
        if device.type == "cuda":
            staging_bytes = 8 * (6 * config.max_num_batched_tokens + 16 * self.max_rows + 256)
            self.staging = StagingRing(device, STAGING_BUFFERS, staging_bytes)
            self.results = ResultRing(lay.pp_size + 2, self.max_rows * packed_width(RING_TOP_LOGPROBS))
        # One device: the sampler may write a plain step's tokens into a result buffer itself (no copy).
        one_device = self.results is not None and lay.world_size == 1
        self.zero_copy = one_device and sampling.writes_pinned_memory(device)
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not config.enforce_eager and self.attn.supports_cuda_graphs:
            from ringllm.engine.cuda_graph import DecodeGraphs

            cascade = not (config.disable_cascade_attention or config.disable_radix_cache)
            self.graphs = DecodeGraphs(
                self.model, self.attn, config.max_bs, self.context_len + 1, device, cascade=cascade
            )
        log.info(
            "model runner ready",
            rank=lay.rank,
            model=self.shape.architecture,
            dtype=str(self.dtype),
            kv_dtype=str(self.kv_dtype),
            device=str(device),
            kv_slots=self.num_slots,
            context_len=self.context_len,
            layers=f"{self.model.layer_range.start}-{self.model.layer_range.stop - 1}",
            backend=type(self.attn).__name__,
            cuda_graphs=self.graphs.buckets if self.graphs else None,
            zero_copy_results=self.zero_copy,
            cascade_graphs=self.graphs.cascade_buckets if self.graphs else None,
        )

    def close(self) -> None:
        """Waits for every step this rank queued, then frees its CUDA graphs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    # ---- sizing ----
    def _profile_activation_bytes(self) -> int:
        """Peak memory of one forward over a full token budget, with a throwaway pool."""
        n = min(self.config.max_num_batched_tokens, self.context_len)

        def forward() -> None:
            pool = KVPool(
                self.num_layers, n + 1, self.num_kv_heads, self.shape.head_dim, self.dtype, self.device, self.kv_dtype
            )
            attn = make_backend(self.config.attention_backend, self.device, pool, self.num_heads, self.shape.head_dim)
            idx = torch.arange(1, n + 1, device=self.device, dtype=torch.int32)
            attn.begin(
                AttentionMetadata(
                    np.array([0, n]),
                    np.array([0, n]),
                    np.array([n]),
                    False,
                    torch.tensor([0, n], device=self.device, dtype=torch.int32),
                    torch.tensor([0, n], device=self.device, dtype=torch.int32),
                    idx,
                    idx,
                )
            )
            carry = None
            if not self.layout.is_first_stage:
                carry = tuple(
                    torch.zeros(n, self.shape.hidden_size, dtype=self.dtype, device=self.device) for _ in "hr"
                )
            with torch.inference_mode():
                hidden = self.model(
                    torch.zeros(n, dtype=torch.long, device=self.device),
                    torch.arange(n, device=self.device),
                    attn,
                    carry,
                )
                if self.layout.is_last_stage:
                    self.model.logits(hidden[-self.config.max_bs :])

        return peak_bytes(self.device, forward)

    # ---- one step ----
    @torch.inference_mode()
    def launch(self, plan: StepPlan, constrain: Callable[[], GrammarMask | None] | None = None) -> StepResult | None:
        """Runs this rank's part of one step. Returns the step's tokens on rank 0 (which reports them), None on
        the other ranks. `constrain` (structured outputs, engine/grammar.py) is called on the sampling rank once
        the forward is queued, and gives the grammar masks of the step's constrained rows."""
        self._admit_rows(plan)
        if self.landing:
            self.landing.land(plan.rows, plan.token_rows)
        meta, ix = self._prepare(plan)
        rows, seq_lens, keep = ix.rows, ix.seq_lens, ix.keep
        input_ids = ix.input_ids if self.layout.is_first_stage else None
        prompt = self._prompt_positions(plan, meta)
        top_k = self._logprobs_width(plan, prompt)
        logits, prompt_hidden = self._forward(meta, input_ids, ix.positions, prompt, ix.in_graph)
        lay = self.layout
        prompt_rows = None
        if prompt_hidden is not None:  # every rank of the last stage: the vocabulary projection is collective
            assert prompt is not None and top_k is not None  # prompt positions make top_k at least 0
            prompt_rows = self._prompt_rows(prompt_hidden, prompt, top_k)
        if lay.is_sampler:
            direct = self._direct_result(plan, top_k, prompt_rows)
            packed = self._sample(plan, meta, logits, ix, top_k, constrain, direct[1] if direct else None)
            if direct is not None and packed is direct[1]:  # the sampler wrote the tokens to the host itself
                assert self.results is not None
                return self.results.landed(direct[0], len(plan.rows), torch.cuda.current_stream(self.device))
            if prompt_rows is not None:
                packed = torch.cat([packed, prompt_rows])
            if self.broadcasts is not None:
                self.broadcasts.send(packed)
            if lay.rank != 0:
                return None
            return copy_to_host(packed, top_k, len(plan.rows), None, self.copy_stream, self.results)
        if self.landing is None:
            return None
        num_prompt_rows = len(prompt.pos) if prompt is not None else 0
        packed, work = self.landing.receive(
            (len(plan.rows) + num_prompt_rows, packed_width(top_k)),
            plan.rows[plan.sample],
            keep,
            rows[keep],
            seq_lens[keep],
        )
        if lay.rank != 0:
            return None
        return copy_to_host(packed, top_k, len(plan.rows), work, self.copy_stream, self.results)

    def _direct_result(self, plan: StepPlan, top_k, prompt_rows) -> tuple[int, torch.Tensor] | None:
        """Where the fused sampler may write a step's packed tokens straight into pinned host memory (one
        device, no logprobs): a free ResultRing buffer for them (step_result.ResultRing.take_direct)."""
        if not self.zero_copy or top_k is not None or prompt_rows is not None:
            return None
        assert self.results is not None
        return self.results.take_direct(len(plan.rows))

    def _sample(
        self, plan: StepPlan, meta: AttentionMetadata, logits, ix: _StepIndices, top_k, constrain=None, out=None
    ) -> torch.Tensor:
        """Samples every row's next token and packs it (with logprobs, where asked) for the host; `out`: where
        the fused sampler may put the packed tokens (the caller checks whether it did)."""
        assert self.sampler is not None, "only the sampler rank samples"
        rows, seq_lens, keep = ix.rows, ix.seq_lens, ix.keep
        history = None
        if self.sampler.needs_history(plan.rows):
            history = self.req_tokens[rows, : int(meta.kv_lens_host.max())]
        mask = constrain() if constrain is not None else None
        # Sampled tokens become the next position's input on the device, before the host sees them: the fused
        # sampler writes them itself where it can (`land`), and packs them then.
        land = (self.req_tokens, ix.keep_flags) if top_k is None else None
        sample = self.sampler(logits, plan.rows, rows, history, seq_lens, mask, land=land, out=out)
        if sample.packed is None:
            self.req_tokens[rows[keep], seq_lens[keep]] = sample.tokens[keep].int()
        return pack_sample(sample, top_k)

    def _logprobs_width(self, plan: StepPlan, prompt: _PromptPositions | None) -> int | None:
        """The k of the step's packed result: the most top logprobs any row (or prompt position) asked for;
        None when nothing asked for logprobs. Every rank derives it from the plan alone."""
        ks = []
        if self.num_logprob_rows:  # most steps: no request row holds logprobs (see _admit_rows)
            want = self.row_logprobs[plan.rows]
            ks = [int(want.max())] if (want >= 0).any() else []
        if prompt is not None:
            ks.append(int(self.row_prompt_logprobs[prompt.rows].max()))
        return max(ks) if ks else None

    def _prompt_positions(self, plan: StepPlan, meta: AttentionMetadata) -> _PromptPositions | None:
        """The step's positions whose prompt logprobs were asked for, or None (nearly every step)."""
        if not self.num_prompt_logprob_rows:
            return None
        ks = self.row_prompt_logprobs[plan.rows]
        if not (ks >= 0).any():
            return None
        index, pos = prompt_logprob_positions(plan.starts, plan.lens, self.row_prompt_len[plan.rows], ks)
        if not len(index):
            return None
        return _PromptPositions(plan.rows[index], pos, meta.qo_indptr_host[index] + pos - plan.starts[index])

    def _prompt_rows(self, hidden: torch.Tensor, prompt: _PromptPositions, top_k: int) -> torch.Tensor:
        """The packed prompt rows (engine/step_result.py) of the prompt positions in `hidden`."""
        rows, pos = prompt.rows, prompt.pos
        target = self.req_tokens[torch.from_numpy(rows).to(self.device), torch.from_numpy(pos + 1).to(self.device)]
        return pack_prompt_rows(self.model.logits, hidden, target, top_k)

    def _admit_rows(self, plan: StepPlan) -> None:
        if not plan.new_rows:
            return
        self.row_logprobs[plan.new_rows] = [-1 if p.logprobs is None else p.logprobs for p in plan.new_params]
        self.row_prompt_logprobs[plan.new_rows] = [
            -1 if p.prompt_logprobs is None else p.prompt_logprobs for p in plan.new_params
        ]
        self.row_prompt_len[plan.new_rows] = plan.new_prompt_lens
        # Rows keep their last request's value until reused; these counts only let most steps skip lookups.
        self.num_prompt_logprob_rows = int((self.row_prompt_logprobs >= 0).sum())
        self.num_logprob_rows = int((self.row_logprobs >= 0).sum())
        if self.sampler is not None:
            self.sampler.set_rows(plan.new_rows, plan.new_params, plan.new_prompt_lens)

    def _forward(self, meta: AttentionMetadata, input_ids, positions, prompt: _PromptPositions | None, in_graph=False):
        """This stage's layers: from the previous stage's hidden states (or the embedding), to the next stage
        (or, on the last stage, the logits of each sequence's last position and the hidden states of the
        `prompt` positions, whose prompt logprobs were asked for). Returns (logits, prompt hidden).
        `in_graph`: the step's inputs already are in the CUDA graph's static buffers."""
        lay = self.layout
        carry = None
        if not lay.is_first_stage:
            T = int(meta.qo_indptr_host[-1])
            carry = tuple(torch.empty(T, self.shape.hidden_size, dtype=self.dtype, device=self.device) for _ in "hr")
            parallel.recv_from_prev_stage(list(carry))
        prompt_hidden = None
        if self.graphs is not None and self.graphs.can_run(meta) and prompt is None:
            out = self.graphs.run(input_ids, positions, meta, carry, prepared=in_graph)
        else:
            self.attn.begin(meta)
            out = self.model(input_ids, positions, self.attn, carry)
            if lay.is_last_stage:
                if prompt is not None:
                    prompt_hidden = out[torch.from_numpy(prompt.token_index).to(self.device)]
                out = self.model.logits(out[meta.qo_indptr[1:].long() - 1])
        if lay.is_last_stage:
            return out, prompt_hidden
        self._sends.append((parallel.send_to_next_stage(list(out)), out))
        while self._sends and (
            len(self._sends) > MAX_PENDING_SENDS or all(w.is_completed() for w in self._sends[0][0])
        ):
            for w in self._sends.popleft()[0]:
                w.wait()
        return None, None

    def _plan_cascade(self, plan: StepPlan, kv_lens: np.ndarray) -> CascadeMetadata | None:
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

    def _prepare(self, plan: StepPlan) -> tuple[AttentionMetadata, _StepIndices]:
        """Everything index-like for the step, sent to the device in one copy: the plan's table writes, then
        the step's rows, lengths and positions. Slot indices for attention are gathered there."""
        if self._decode_kernel_fits(plan):
            return self._prepare_decode(plan)
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
        meta.cascade = self._plan_cascade(plan, kv_lens)
        input_ids = self.req_tokens[row_of_token_d, positions_d].long() if self.layout.is_first_stage else None
        return meta, _StepIndices(rows, positions_d, input_ids, seq_lens, keep, keep_flags)

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

    def _decode_kernel_fits(self, plan: StepPlan) -> bool:
        """A CUDA decode step whose only slot writes are each sequence's new position (a plain batch of
        decodes, as the scheduler places them): kernels.decode_prep does its table write and gathers."""
        B = len(plan.rows)
        return (
            self.device.type == "cuda"
            and kernels.triton is not None
            and B > 0
            and plan.is_decode
            and len(plan.slot_ids) == B
            # the scheduler's bulk-placed decodes share these arrays (a worker's decoded plan does not)
            and (plan.slot_rows is plan.rows or np.array_equal(plan.slot_rows, plan.rows))
            and (plan.slot_pos is plan.starts or np.array_equal(plan.slot_pos, plan.starts))
        )

    def _prepare_decode(self, plan: StepPlan) -> tuple[AttentionMetadata, _StepIndices]:
        """`_prepare` for a decode step, in one small copy and one kernel launch instead of some twenty torch
        ops: the new slots go into req_to_slot and the slot lists, out slots, positions and input ids are
        gathered by kernels.decode_prep, into the CUDA graph's static buffers when the step replays one."""
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
        decode_prep.decode_prep(rows, seq_lens, kv_d, new_slots, int(kv_lens.max()), *tables, *outputs)
        meta = AttentionMetadata(qo_indptr, kv_indptr, kv_lens, True, qo_d, kv_d, indices[:n], out_slots[:B])
        meta.cascade = self._plan_cascade(plan, kv_lens)
        ix = _StepIndices(rows, positions[:B], input_ids[:B], seq_lens, keep, keep_flags, in_graph=bs is not None)
        return meta, ix
