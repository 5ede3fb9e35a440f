"""Owns the model, the KV pool and the device-side request tables, and runs one StepPlan at a time.

The request tables live on the device: `req_to_slot[row, pos]` (where each position's K/V is) and
`req_tokens[row, pos]` (the token at each position). A step's input ids, positions and attention indices are
gathered from them on the device, and each sampled token is written straight back into `req_tokens`, so the
next step can run before the host has read it (overlap)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.attention import AttentionMetadata, make_backend
from engine.config import EngineConfig
from engine.kv_cache import KVPool
from engine.loader import load_weights, pick_dtype
from engine.logs import get_logger
from engine.models import model_class
from engine.sampler import SampleResult, Sampler
from engine.scheduler import StepPlan

log = get_logger("engine.runner")


@dataclass
class StepResult:
    """A launched step's sampled tokens: on the device now, on the host once `ready` has fired."""

    sample: SampleResult
    host_tokens: torch.Tensor
    ready: torch.cuda.Event | None

    def wait(self) -> tuple[np.ndarray, SampleResult]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_tokens.numpy(), self.sample


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path, hf_config: dict, device: torch.device):
        self.config = config
        self.device = device
        self.dtype = pick_dtype(config.dtype, hf_config, device)
        cls = model_class(hf_config)
        self.shape = cls.shape(hf_config)
        self.context_len = config.context_len or self.shape.max_position_embeddings
        torch.manual_seed(config.seed)
        with torch.device(device):
            self.model = cls(self.shape, max_positions=self.context_len + 1)
        load_weights(self.model, model_path)
        self.model.to(dtype=self.dtype).eval()
        self.model.rotary.cos, self.model.rotary.sin = self.model.rotary.cos.float(), self.model.rotary.sin.float()
        self.max_rows = config.max_bs
        self.num_slots = self._pool_size()
        self.pool = KVPool(self.shape.num_layers, self.num_slots, self.shape.num_kv_heads, self.shape.head_dim,
                           self.dtype, device)
        self.attn = make_backend(config.attention_backend, device, self.pool, self.shape.num_heads, self.shape.head_dim)
        self.req_to_slot = torch.zeros(self.max_rows, self.context_len + 1, dtype=torch.int32, device=device)
        self.req_tokens = torch.zeros(self.max_rows, self.context_len + 2, dtype=torch.int32, device=device)
        self.sampler = Sampler(self.max_rows, self.shape.vocab_size, device, config.seed)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.graphs = None
        if device.type == "cuda" and not config.enforce_eager and hasattr(self.attn, "make_graph_decoder"):
            from engine.cuda_graph import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.attn, config.max_bs, self.context_len + 1, device)
        log.info("model runner ready", model=self.shape.architecture, dtype=str(self.dtype), device=str(device),
                 kv_slots=self.num_slots, context_len=self.context_len, backend=type(self.attn).__name__,
                 cuda_graphs=self.graphs.buckets if self.graphs else None)

    # ---- sizing ----
    def _pool_size(self) -> int:
        per_token = KVPool.bytes_per_token(self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim,
                                           self.dtype)
        if self.config.kv_cache_tokens:
            return self.config.kv_cache_tokens + 1
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            peak = self._profile_activation_bytes()
            # Beyond the forward's peak: attention workspaces, CUDA graphs, sampler temporaries.
            budget = total * self.config.gpu_memory_utilization - (total - free) - peak - (2 << 30)
        else:
            budget = self.config.cpu_kv_cache_gb * (1 << 30)
        slots = int(budget // per_token)
        if slots < 2:
            raise ValueError(f"no memory left for the KV cache ({budget / 2**30:.2f} GiB budget, "
                             f"{per_token} bytes per token): lower the model size or raise the memory budget")
        return slots

    def _profile_activation_bytes(self) -> int:
        """Peak memory of one forward over a full token budget, with a throwaway pool."""
        n = min(self.config.max_num_batched_tokens, self.context_len)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        pool = KVPool(self.shape.num_layers, n + 1, self.shape.num_kv_heads, self.shape.head_dim, self.dtype, self.device)
        attn = make_backend(self.config.attention_backend, self.device, pool, self.shape.num_heads, self.shape.head_dim)
        idx = torch.arange(1, n + 1, device=self.device, dtype=torch.int32)
        attn.begin(AttentionMetadata(np.array([0, n]), np.array([0, n]), np.array([n]), False,
                                     torch.tensor([0, n], device=self.device, dtype=torch.int32),
                                     torch.tensor([0, n], device=self.device, dtype=torch.int32), idx, idx))
        with torch.inference_mode():
            hidden = self.model(torch.zeros(n, dtype=torch.long, device=self.device),
                                torch.arange(n, device=self.device), attn)
            self.model.logits(hidden[-self.config.max_bs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del pool, attn, hidden
        torch.cuda.empty_cache()
        return peak

    # ---- one step ----
    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> StepResult:
        if plan.new_rows:
            self.sampler.set_rows(plan.new_rows, plan.new_params, plan.new_prompt_lens)
        meta, rows, positions, row_of_token, seq_lens, keep = self._prepare(plan)
        input_ids = self.req_tokens[row_of_token, positions].long()
        if self.graphs is not None and self.graphs.can_run(meta):
            logits = self.graphs.run(input_ids, positions, meta)
        else:
            self.attn.begin(meta)
            hidden = self.model(input_ids, positions, self.attn)
            logits = self.model.logits(hidden[meta.qo_indptr[1:].long() - 1])
        history = None
        if self.sampler.needs_history(plan.rows):
            history = self.req_tokens[rows, : int(meta.kv_lens_host.max())]
        sample = self.sampler(logits, plan.rows, rows, history, seq_lens)
        # Sampled tokens become the next position's input on the device, before the host sees them.
        self.req_tokens[rows[keep], seq_lens[keep]] = sample.tokens[keep].int()
        return self._copy_to_host(sample)

    def _prepare(self, plan: StepPlan):
        """Everything index-like for the step, sent to the device in one copy: the plan's table writes, then
        the step's rows, lengths and positions. Slot indices for attention are gathered there."""
        lens, starts = plan.lens.astype(np.int64), plan.starts.astype(np.int64)
        kv_lens = starts + lens
        qo_indptr = np.concatenate([[0], np.cumsum(lens)])
        kv_indptr = np.concatenate([[0], np.cumsum(kv_lens)])
        T, B = int(qo_indptr[-1]), len(lens)
        row_of_token = np.repeat(plan.rows, lens)
        positions = np.arange(T) - np.repeat(qo_indptr[:-1], lens) + np.repeat(starts, lens)
        parts = [plan.slot_rows, plan.slot_pos, plan.slot_ids, plan.token_rows, plan.token_pos, plan.token_ids,
                 plan.rows, kv_lens, qo_indptr, kv_indptr, row_of_token, positions, np.flatnonzero(plan.sample)]
        packed = torch.from_numpy(np.concatenate(parts).astype(np.int64))
        if self.device.type == "cuda":
            packed = packed.pin_memory().to(self.device, non_blocking=True)
        (slot_rows, slot_pos, slot_ids, tok_rows, tok_pos, tok_ids, rows, seq_lens, qo_d, kv_d, row_of_token_d,
         positions_d, keep) = packed.split([len(x) for x in parts])
        if len(slot_ids):
            self.req_to_slot[slot_rows, slot_pos] = slot_ids.int()
        if len(tok_ids):
            self.req_tokens[tok_rows, tok_pos] = tok_ids.int()
        total_kv = int(kv_indptr[-1])
        kv_rows = torch.repeat_interleave(rows, seq_lens, output_size=total_kv)
        kv_pos = torch.arange(total_kv, device=self.device) - torch.repeat_interleave(kv_d[:-1], seq_lens,
                                                                                      output_size=total_kv)
        kv_indices = self.req_to_slot[kv_rows, kv_pos]
        out_slots = self.req_to_slot[row_of_token_d, positions_d]
        meta = AttentionMetadata(qo_indptr, kv_indptr, kv_lens, plan.is_decode, qo_d.int(), kv_d.int(), kv_indices,
                                 out_slots)
        return meta, rows, positions_d, row_of_token_d, seq_lens, keep

    def _copy_to_host(self, sample: SampleResult) -> StepResult:
        if self.copy_stream is None:
            return StepResult(sample, sample.tokens, None)
        host = torch.empty(sample.tokens.shape, dtype=sample.tokens.dtype, pin_memory=True)
        done = torch.cuda.Event()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            host.copy_(sample.tokens, non_blocking=True)
            done.record()
        return StepResult(sample, host, done)
