"""Decode steps replayed from CUDA graphs, one per batch-size bucket, sharing one memory pool.

A decode step launches hundreds of small kernels; replaying them from a graph removes the launch gaps that
dominate at small batch. Batches are padded up to the next bucket: padded rows read and write slot 0, which
the allocator never hands out.

Under pipeline parallelism a stage's graph starts from static hidden/residual buffers that the received
activations are copied into, and a stage before the last returns (hidden, residual) instead of logits. The
stage-to-stage transfers stay outside the graphs; tensor-parallel collectives are captured inside them.

Where the backend runs cascade attention in graphs (decode rows sharing cached prefixes: engine/core/cascade.py
groups them, engine/attention/cascade.py attends), buckets from CASCADE_MIN_BS up also get a cascade graph,
replayed for a step whose AttentionMetadata.cascade is set: level 1 over each row's own slots in the same
indices buffer, level 0 over the groups' prefixes in a second one (`shared_indices`), laid out by
cascade.fill_graph_buffers.
Cascade graphs add one capture per bucket from CASCADE_MIN_BS up (their logits outputs too, in the pool)."""

from __future__ import annotations

import gc
import os
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ringllm.engine.attention.base import AttentionMetadata
from ringllm.engine.attention.cascade import CascadeMetadata, fill_graph_buffers
from ringllm.engine.core.cascade import CASCADE_MIN_BS, MAX_GROUPS


def batch_buckets(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


class DecodeGraphs:
    def __init__(self, model, attn, max_bs: int, max_context: int, device: torch.device, cascade: bool = False):
        """`cascade`: also capture cascade graphs (where the backend supports them)."""
        self.model, self.attn, self.device = model, attn, device
        self.buckets = batch_buckets(max_bs)
        max_bs = self.buckets[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.out_slots = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.indices = torch.zeros(max_bs * max_context, dtype=torch.int32, device=device)
        cascade = cascade and attn.supports_cascade_graphs
        self.cascade_buckets = [b for b in self.buckets if b >= CASCADE_MIN_BS] if cascade else []
        # level 0's slots: at most MAX_GROUPS prefixes, then one slot per entry past the groups
        self.shared_indices = torch.zeros(
            MAX_GROUPS * max_context + MAX_GROUPS + 1 if cascade else 0, dtype=torch.int32, device=device
        )
        self.cascade_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.cascade_outputs: dict[int, Any] = {}
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
                self.graphs[bs], self.outputs[bs] = self._capture_one(bs)
                if bs in self.cascade_buckets:
                    # captured with no groups: every row in level 0's last entry, over slot 0 (graph_layout)
                    self.attn.make_graph_cascade(bs, self.shared_indices)
                    self._begin_cascade(None, bs)
                    self.cascade_graphs[bs], self.cascade_outputs[bs] = self._capture_one(bs)
            torch.cuda.synchronize(self.device)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _capture_one(self, bs: int):
        """A graph of the forward at batch size `bs` as the backend was just planned, and its outputs."""
        self._forward(bs)  # warm-up outside the graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._forward(bs)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, outputs

    def _forward(self, bs: int):
        carry = None if self.carry is None else (self.carry[0][:bs], self.carry[1][:bs])
        out = self.model(self.input_ids[:bs], self.positions[:bs], self.attn, carry)
        return self.model.logits(out) if self.last_stage else out

    def close(self) -> None:
        """Frees the graphs. Their captured collectives hold the NCCL communicators, which cannot be torn
        down while a graph that uses them exists."""
        for graph in [*self.graphs.values(), *self.cascade_graphs.values()]:
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()
        self.cascade_graphs.clear()
        self.cascade_outputs.clear()
        self.pool = None

    def can_run(self, meta: AttentionMetadata) -> bool:
        if not meta.is_decode or meta.batch_size > self.buckets[-1]:
            return False
        # a cascade step (shared prefixes) replays its bucket's cascade graph, where there is one
        cascade = meta.cascade
        return cascade is None or (self.has_cascade_graph(meta.batch_size) and cascade.num_groups <= MAX_GROUPS)

    def has_cascade_graph(self, b: int) -> bool:
        """Whether a decode step of b rows replays a bucket that has a cascade graph."""
        return self.bucket_for(b) in self.cascade_graphs

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
        if meta.cascade is not None:
            self._begin_cascade(meta.cascade, bs)
            graph, out = self.cascade_graphs[bs], self.cascade_outputs[bs]
        else:
            self.attn.begin_graph(bs, kv_indptr, self.indices[: n + bs - b], self.out_slots[:bs])
            graph, out = self.graphs[bs], self.outputs[bs]
        graph.replay()
        return out[:b] if self.last_stage else tuple(t[:b].clone() for t in out)

    def _begin_cascade(self, cascade: CascadeMetadata | None, bs: int) -> None:
        """Plans the cascade graph of bucket `bs` (None: for its capture): level 1's slots go into `indices`
        (over the whole slot lists decode_prep may have put there), level 0's into `shared_indices`."""
        layout, unique = fill_graph_buffers(cascade, bs, self.indices, self.shared_indices)
        self.attn.begin_graph(bs, layout.unique_kv_indptr_host, unique, self.out_slots[:bs], cascade=layout)

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
        if meta.cascade is None:  # a cascade step's slots go in by _begin_cascade
            self.indices[:n] = meta.kv_indices
            self.indices[n : n + bs - b] = 0
