"""Decode steps replayed from CUDA graphs, one per batch-size bucket, sharing one memory pool.

A decode step launches hundreds of small kernels; replaying them from a graph removes the launch gaps that
dominate at small batch. Batches are padded up to the next bucket: padded rows read and write slot 0, which
the allocator never hands out.

Under pipeline parallelism a stage's graph starts from static hidden/residual buffers that the received
activations are copied into, and a stage before the last returns (hidden, residual) instead of logits. The
stage-to-stage transfers stay outside the graphs; tensor-parallel collectives are captured inside them."""

from __future__ import annotations

import gc
import os
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from engine.attention.base import AttentionMetadata


def batch_buckets(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


class DecodeGraphs:
    def __init__(self, model, attn, max_bs: int, max_context: int, device: torch.device):
        self.model, self.attn, self.device = model, attn, device
        self.buckets = batch_buckets(max_bs)
        max_bs = self.buckets[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.out_slots = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.indices = torch.zeros(max_bs * max_context, dtype=torch.int32, device=device)
        lay = model.layout
        self.last_stage = lay.is_last_stage
        self.carry = None
        if not lay.is_first_stage:
            hidden, dtype = model.shape.hidden_size, next(model.parameters()).dtype
            self.carry = tuple(torch.zeros(max_bs, hidden, dtype=dtype, device=device) for _ in "hr")
        self.outputs: dict[int, Any] = {}  # logits, or (hidden, residual) before the last stage
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None  # the graphs' shared memory pool (an opaque handle)
        self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        disable = not os.isatty(2) or os.environ.get("RINGLLM_NO_PROGRESS") == "1"
        # The cyclic garbage collector must not run during a capture: collecting an earlier engine that was
        # never closed resets its graphs, and a reset is not permitted while a stream captures, which
        # invalidates this capture (seen in the GPU tests: "operation not permitted when stream is capturing
        # (function reset)"). Collect first, then keep it off until every graph is captured.
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for bs in tqdm(list(reversed(self.buckets)), desc="capturing CUDA graphs", unit="graph", disable=disable):
                self.attn.make_graph_decoder(bs, self.indices)
                self.attn.begin_graph(bs, np.arange(bs + 1), self.indices[:bs], self.out_slots[:bs])
                self._forward(bs)  # warm-up outside the graph
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.outputs[bs] = self._forward(bs)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[bs] = graph
            torch.cuda.synchronize(self.device)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _forward(self, bs: int):
        carry = None if self.carry is None else (self.carry[0][:bs], self.carry[1][:bs])
        out = self.model(self.input_ids[:bs], self.positions[:bs], self.attn, carry)
        return self.model.logits(out) if self.last_stage else out

    def close(self) -> None:
        """Frees the graphs. Their captured collectives hold the NCCL communicators, which cannot be torn
        down while a graph that uses them exists."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None

    def can_run(self, meta: AttentionMetadata) -> bool:
        # a cascade step (shared prefixes, engine/attention/cascade.py) runs eagerly
        return meta.is_decode and meta.cascade is None and meta.batch_size <= self.buckets[-1]

    def bucket_for(self, b: int) -> int | None:
        """The captured batch size a decode batch of b replays (padded up to it), or None past the largest."""
        return next((x for x in self.buckets if x >= b), None)

    def run(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        carry=None,
        prepared: bool = False,
    ):
        """Logits [b, vocab] on the last stage; before it, copies of (hidden, residual), safe to send while the
        next replay rewrites the static outputs. `prepared`: input ids, positions, out slots and indices, with
        the padding rows, already are in the static buffers (kernels.decode_prep wrote them there)."""
        b = meta.batch_size
        bs = next(x for x in self.buckets if x >= b)
        n = int(meta.kv_indptr_host[-1])
        kv_indptr = np.concatenate([meta.kv_indptr_host, n + np.arange(1, bs - b + 1)])
        if carry is not None:
            assert self.carry is not None, "a stage after the first was built with carry buffers"
            for static, received in zip(self.carry, carry):
                static[:b] = received
                static[b:bs] = 0
        if not prepared:
            self._copy_inputs(input_ids, positions, meta, b, bs, n)
        self.attn.begin_graph(bs, kv_indptr, self.indices[: n + bs - b], self.out_slots[:bs])
        self.graphs[bs].replay()
        out = self.outputs[bs]
        return out[:b] if self.last_stage else tuple(t[:b].clone() for t in out)

    def _copy_inputs(self, input_ids, positions, meta: AttentionMetadata, b: int, bs: int, n: int) -> None:
        """The step's inputs into the static buffers, and the padding rows: token 0 at position 0, one cached
        slot (slot 0)."""
        if input_ids is not None:
            self.input_ids[:b] = input_ids
        self.positions[:b] = positions
        self.out_slots[:b] = meta.out_slots
        if bs > b:
            self.input_ids[b:bs] = 0
            self.positions[b:bs] = 0
            self.out_slots[b:bs] = 0
        self.indices[:n] = meta.kv_indices
        self.indices[n : n + bs - b] = 0
