"""Owns the model, the KV pool and the device-side request tables, and runs one StepPlan at a time in two
phases: `forward` queues the step's forward on the device and returns at once; `sample` samples its tokens and
sends them on their way to the host. The engine builds what sampling needs in between (grammar masks, which
depend on tokens still in flight); a worker rank runs the two back to back.

The request tables live on the device: `req_to_slot[row, pos]` (where each position's K/V is) and
`req_tokens[row, pos]` (the token at each position). A step's input ids, positions and attention indices are
gathered from them on the device (inputs.py), and each sampled token is written straight back into
`req_tokens` (result_sink.py), so the next step can run before the host has read it (overlap).

Its collaborators: the model (engine/models), the KV pool (engine/kv_cache.py) and its sizing (memory.py),
the attention backend (engine/attention, which declares whether CUDA graphs can run it: cuda_graph.py), the
step inputs (inputs.py), the row table and the sampler (engine/sampler/), the result sink (result_sink.py),
and the collectives and token landing of a parallel engine (engine/parallel.py)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ringllm.engine import parallel
from ringllm.engine.attention import AttentionMetadata, make_backend
from ringllm.engine.config import EngineConfig
from ringllm.engine.core.plan import StepPlan
from ringllm.engine.kernels import triton
from ringllm.engine.kv_cache import KVPool, kv_cache_dtype
from ringllm.engine.loader import generation_eos_ids, load_weights, pick_dtype
from ringllm.engine.logs import get_logger
from ringllm.engine.models import model_class
from ringllm.engine.parallel import MAX_PENDING_SENDS, Layout, TokenLanding
from ringllm.engine.runner.cuda_graph import DecodeGraphs
from ringllm.engine.runner.inputs import StepIndices, StepInputs
from ringllm.engine.runner.kernel_cache import cached_kernels, kernel_names, use_kernel_caches
from ringllm.engine.runner.memory import pool_slots
from ringllm.engine.runner.result_sink import StepResults, pack_prompt_rows
from ringllm.engine.sampler import GrammarMask, RowTable, Sampler
from ringllm.engine.step_result import StepResult, packed_width, prompt_logprob_positions

log = get_logger("engine.runner")


@dataclass
class PromptPositions:
    """A step's positions whose prompt logprobs were asked for: request row, position, index among the
    step's tokens."""

    rows: np.ndarray
    pos: np.ndarray
    token_index: np.ndarray


@dataclass
class StepForward:
    """A step whose forward is queued on the device, waiting to be sampled (ModelRunner.sample)."""

    plan: StepPlan
    meta: AttentionMetadata
    ix: StepIndices
    logits: torch.Tensor | None  # [B, V] on the last stage
    top_k: int | None  # the packed result's logprobs width (step_result.py); None: tokens alone
    prompt: PromptPositions | None
    prompt_rows: torch.Tensor | None  # the packed prompt rows, on the last stage


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_path: Path,
        hf_config: dict,
        device: torch.device,
        layout: Layout | None = None,
    ):
        self.cached_at_start: set[str] = set()  # the on-disk kernel caches' entries before this runner compiled
        if device.type == "cuda":  # before FlashInfer is imported or any kernel compiles (kernel_cache.py)
            use_kernel_caches()
            self.cached_at_start = cached_kernels()
        self.config = config
        self.device = device
        self.layout = lay = layout or Layout()
        self.dtype = pick_dtype(config.dtype, hf_config, device)
        cls = model_class(hf_config)
        self.shape = cls.read_shape(hf_config)
        self.eos_token_ids = sorted(set(self.shape.eos_token_ids) | generation_eos_ids(model_path))
        self.context_len = config.context_len or self.shape.max_position_embeddings
        torch.manual_seed(config.seed)
        deterministic = config.enable_deterministic_inference
        if deterministic and device.type == "cuda" and triton is None:
            raise ValueError("--enable-deterministic-inference on a GPU needs Triton (its batch-invariant GEMM)")
        with torch.device(device):
            self.model = cls(self.shape, max_positions=self.context_len + 1, layout=lay, batch_invariant=deterministic)
        load_weights(self.model, model_path)
        self.model.to(dtype=self.dtype).eval()
        self.model.rotary.cos, self.model.rotary.sin = self.model.rotary.cos.float(), self.model.rotary.sin.float()
        attn0 = self.model.layers[0].self_attn
        self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.num_slots = pool_slots(config, self.model, self.context_len, self.kv_dtype, device)
        self.pool = KVPool(
            len(self.model.layers),
            self.num_slots,
            attn0.num_kv_heads,
            self.shape.head_dim,
            self.dtype,
            device,
            self.kv_dtype,
        )
        self.attn = make_backend(
            config.attention_backend, device, self.pool, attn0.num_heads, self.shape.head_dim, deterministic
        )
        # Pipeline stages work on different micro-batches at once: each gets up to max_bs rows of its own.
        self.max_rows = config.max_bs * lay.pp_size
        self.req_to_slot = torch.zeros(self.max_rows, self.context_len + 1, dtype=torch.int32, device=device)
        self.req_tokens = torch.zeros(self.max_rows, self.context_len + 2, dtype=torch.int32, device=device)
        # Every rank reads the row table (it sizes each step's result); only the sampler needs it on its device.
        self.row_table = RowTable(self.max_rows, device if lay.is_sampler else None)
        self.sampler = None
        if lay.is_sampler:
            self.sampler = Sampler(
                self.row_table, self.shape.vocab_size, config.seed, self.req_tokens, self.eos_token_ids
            )
        # Tokens travel from the sampler to the ranks that embed or report them (a parallel engine only).
        self.landing = TokenLanding(self.req_tokens) if lay.receives_tokens else None
        self.results = StepResults(self.req_tokens, lay, self.max_rows)
        self._sends: deque = deque()  # (work, tensors) of stage-to-stage sends still in flight
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and not config.enforce_eager and self.attn.supports_cuda_graphs:
            cascade = not (config.disable_cascade_attention or config.disable_radix_cache or deterministic)
            self.graphs = DecodeGraphs(
                self.model, self.attn, config.max_bs, self.context_len + 1, device, cascade=cascade
            )
        staging_bytes = 8 * (6 * config.max_num_batched_tokens + 16 * self.max_rows + 256)
        self.inputs = StepInputs(
            self.req_to_slot, self.req_tokens, self.attn, self.graphs, lay.is_first_stage, staging_bytes
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
            zero_copy_results=self.results.zero_copy,
            cascade_graphs=self.graphs.cascade_buckets if self.graphs else None,
            deterministic=deterministic,
        )

    def close(self) -> None:
        """Waits for every step this rank queued, then frees its CUDA graphs."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None

    def kernels_built(self) -> list[str]:
        """The kernels this process compiled into the on-disk caches since the runner started (none on the CPU):
        what a start with a warm cache no longer compiles."""
        if self.device.type != "cuda":
            return []
        return kernel_names(cached_kernels() - self.cached_at_start)

    def forget_requests(self) -> None:
        """The row table and the sampler's noise as built, once no request is in flight: what the start-up
        warm-up (warmup.py) ran leaves nothing a later request could see."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the warm-up's last steps still read the row table
        self.row_table.clear()
        if self.sampler is not None:
            self.sampler.reset()

    # ---- one step, in two phases (both under torch.inference_mode(), which the caller enters once a step:
    # entering it costs the host ~2 us, and a batch-1 decode step is host-bound) ----
    def forward(self, plan: StepPlan) -> StepForward:
        """Queues this rank's forward of one step on the device (and, on the last stage, its prompt-logprob rows:
        their vocabulary projection is collective) without waiting for it."""
        assert torch.is_inference_mode_enabled(), "a step runs under torch.inference_mode()"
        if plan.new_rows:
            self.row_table.set(plan.new_rows, plan.new_params, plan.new_prompt_lens)
        if self.landing:
            self.landing.land(plan.rows, plan.token_rows)
        meta, ix = self.inputs.prepare(plan)
        prompt = self._prompt_positions(plan, meta)
        top_k = self._logprobs_width(plan, prompt)
        logits, prompt_hidden = self._layers(meta, ix, prompt)
        prompt_rows = None
        if prompt_hidden is not None:
            assert prompt is not None and top_k is not None  # prompt positions make top_k at least 0
            prompt_rows = self._prompt_rows(prompt_hidden, prompt, top_k)
        return StepForward(plan, meta, ix, logits, top_k, prompt, prompt_rows)

    def sample(self, step: StepForward, mask: GrammarMask | None = None) -> StepResult | None:
        """Samples the step's tokens (on the sampler rank; `mask`: the grammar masks of its constrained rows) or
        receives them (the ranks that embed or report them). Returns the step's result on rank 0, which reports
        the tokens; None on the other ranks."""
        assert torch.is_inference_mode_enabled(), "a step runs under torch.inference_mode()"
        plan, ix = step.plan, step.ix
        if self.sampler is not None:
            assert step.logits is not None  # the sampler is on the last stage
            sink = self.results.sink(ix, step.top_k, step.prompt_rows)
            self.sampler(step.logits, plan.rows, ix.rows, step.meta.kv_lens_host, ix.seq_lens, mask, sink)
            return sink.close()
        if self.landing is None:
            return None
        num_prompt_rows = len(step.prompt.pos) if step.prompt is not None else 0
        shape = (len(plan.rows) + num_prompt_rows, packed_width(step.top_k))
        keep = ix.keep
        packed, work = self.landing.receive(shape, plan.rows[plan.sample], keep, ix.rows[keep], ix.seq_lens[keep])
        return self.results.received(packed, step.top_k, len(plan.rows), work)

    def _layers(self, meta: AttentionMetadata, ix: StepIndices, prompt: PromptPositions | None):
        """This stage's layers: from the previous stage's hidden states (or the embedding), to the next stage
        (or, on the last stage, the logits of each sequence's last position and the hidden states of the
        `prompt` positions, whose prompt logprobs were asked for). Returns (logits, prompt hidden)."""
        lay = self.layout
        input_ids = ix.input_ids if lay.is_first_stage else None
        carry = None
        if not lay.is_first_stage:
            T = int(meta.qo_indptr_host[-1])
            carry = tuple(torch.empty(T, self.shape.hidden_size, dtype=self.dtype, device=self.device) for _ in "hr")
            parallel.recv_from_prev_stage(list(carry))
        prompt_hidden = None
        if self.graphs is not None and self.graphs.can_run(meta) and prompt is None:
            # in_graph: the step's inputs already are in the CUDA graph's static buffers (decode_prep)
            out = self.graphs.run(input_ids, ix.positions, meta, carry, prepared=ix.in_graph)
        else:
            self.attn.begin(meta)
            out = self.model(input_ids, ix.positions, self.attn, carry)
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

    # ---- logprobs ----
    def _logprobs_width(self, plan: StepPlan, prompt: PromptPositions | None) -> int | None:
        """The k of the step's packed result: the most top logprobs any row (or prompt position) asked for;
        None when nothing asked for logprobs. Every rank derives it from the plan alone."""
        width = self.row_table.logprobs_width(plan.rows)
        ks = [] if width is None else [width]
        if prompt is not None:
            ks.append(int(self.row_table.host["prompt_logprobs"][prompt.rows].max()))
        return max(ks) if ks else None

    def _prompt_positions(self, plan: StepPlan, meta: AttentionMetadata) -> PromptPositions | None:
        """The step's positions whose prompt logprobs were asked for, or None (nearly every step)."""
        table = self.row_table
        if not table.held["prompt_logprobs"]:
            return None
        ks = table.host["prompt_logprobs"][plan.rows]
        if not (ks >= 0).any():
            return None
        index, pos = prompt_logprob_positions(plan.starts, plan.lens, table.host["prompt_len"][plan.rows], ks)
        if not len(index):
            return None
        return PromptPositions(plan.rows[index], pos, meta.qo_indptr_host[index] + pos - plan.starts[index])

    def _prompt_rows(self, hidden: torch.Tensor, prompt: PromptPositions, top_k: int) -> torch.Tensor:
        """The packed prompt rows (engine/step_result.py) of the prompt positions in `hidden`."""
        rows, pos = prompt.rows, prompt.pos
        target = self.req_tokens[torch.from_numpy(rows).to(self.device), torch.from_numpy(pos + 1).to(self.device)]
        return pack_prompt_rows(self.model.logits, hidden, target, top_k)
