"""Shared-prefix (cascade) attention for decode steps, on FlashInfer.

Cascade attention splits each decode row's context in two: level 0, the prefix its group shares, attended by
all of the group's queries at once (one non-causal "prefill" whose query length is the group's size, so the
prefix is read once per group), and level 1, the row's own slots past it (plain decode). The two partial
outputs are merged through their log-sum-exp states, which gives exactly the attention over the whole context.

Who shares what, and when it pays, is decided on the host without torch (engine/core/cascade.py: the
grouping, MAX_GROUPS and the thresholds). Here: `plan_cascade` turns a step's groups into slot indices on the
device, and the FlashInfer wrappers that run them, eagerly and inside CUDA graphs (`graph_layout`,
`fill_graph_buffers`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ringllm.engine.core.cascade import MAX_GROUPS


@dataclass
class CascadeMetadata:
    """Decode rows [0, shared_qo_indptr_host[-1]) attend to their group's shared prefix (level 0) and every
    row to its own slots past it (level 1)."""

    shared_qo_indptr_host: np.ndarray  # [G+1] each group's decode rows
    shared_kv_indptr_host: np.ndarray  # [G+1] offsets of each group's prefix slots in shared_kv_indices
    shared_kv_indices: torch.Tensor  # [sum shared_lens]
    unique_kv_indptr_host: np.ndarray  # [B+1] offsets of each row's own slots in unique_kv_indices
    unique_kv_indices: torch.Tensor  # [sum (kv_len - shared len)]

    @property
    def num_grouped(self) -> int:
        return int(self.shared_qo_indptr_host[-1])

    @property
    def num_groups(self) -> int:
        return len(self.shared_qo_indptr_host) - 1


def plan_cascade(
    rows: np.ndarray,
    kv_lens: np.ndarray,
    shared_indptr: np.ndarray,
    shared_lens: np.ndarray,
    req_to_slot: torch.Tensor,
) -> CascadeMetadata:
    """The cascade indices of a decode step whose rows `rows` (with `kv_lens` positions each) start with the
    groups of (`shared_indptr`, `shared_lens`; core.cascade.worth_cascading chose them). The prefix of a group
    is read from its first row's slots (every row of the group holds the same slots there: the radix tree's).
    The indices are gathered from `req_to_slot` on its device after one small host-to-device copy."""
    sizes = np.diff(shared_indptr)
    shared_per_row = np.zeros(len(rows), dtype=np.int64)
    shared_per_row[: shared_indptr[-1]] = np.repeat(shared_lens, sizes)
    unique_lens = kv_lens.astype(np.int64) - shared_per_row
    assert (unique_lens >= 1).all(), "a decode row's new position is never in a shared prefix"
    # One flat gather over G + B segments (row, first position, length): the groups' prefixes, then each
    # row's own part.
    seg_rows = np.concatenate([rows[shared_indptr[:-1]], rows]).astype(np.int64)
    seg_starts = np.concatenate([np.zeros(len(shared_lens), dtype=np.int64), shared_per_row])
    seg_lens = np.concatenate([shared_lens.astype(np.int64), unique_lens])
    seg_offsets = np.concatenate([[0], np.cumsum(seg_lens)])
    total, num_shared = int(seg_offsets[-1]), int(seg_offsets[len(shared_lens)])
    small = torch.from_numpy(np.concatenate([seg_rows, seg_starts, seg_lens, seg_offsets[:-1]]))
    device = req_to_slot.device
    if device.type == "cuda":
        small = small.pin_memory().to(device, non_blocking=True)
    seg_rows_d, seg_starts_d, seg_lens_d, seg_offsets_d = small.view(4, -1)
    seg = torch.repeat_interleave(torch.arange(len(seg_lens), device=device), seg_lens_d, output_size=total)
    pos = torch.arange(total, device=device) - seg_offsets_d[seg] + seg_starts_d[seg]
    indices = req_to_slot[seg_rows_d[seg], pos]
    return CascadeMetadata(
        shared_qo_indptr_host=shared_indptr.astype(np.int64),
        shared_kv_indptr_host=seg_offsets[: len(shared_lens) + 1],
        shared_kv_indices=indices[:num_shared],
        unique_kv_indptr_host=seg_offsets[len(shared_lens) :] - num_shared,
        unique_kv_indices=indices[num_shared:],
    )


def plan_levels(prefill, decode, shared: tuple, unique: tuple, heads: tuple, last_page_len, kinds: dict) -> None:
    """Plans level 0 on `prefill` over `shared` = (query indptr, slot indptr, slot indices) of its entries,
    non-causal, and level 1 on `decode` over `unique` = (slot indptr, slot indices) of each row; `heads` =
    (query heads, KV heads, head dim, page size), `last_page_len(n)` n ones."""
    qo_indptr, kv_indptr, kv_indices = shared
    prefill.plan(
        torch.from_numpy(qo_indptr.astype(np.int32)),
        torch.from_numpy(kv_indptr.astype(np.int32)),
        kv_indices,
        last_page_len(len(kv_indptr) - 1),
        *heads,
        causal=False,
        **kinds,
    )
    row_indptr, row_indices = unique
    decode.plan(
        torch.from_numpy(row_indptr.astype(np.int32)), row_indices, last_page_len(len(row_indptr) - 1), *heads, **kinds
    )


class FlashInferCascade:
    """Cascade decode on FlashInfer: level 0 on a paged prefill wrapper (non-causal, query length = the
    group's size), level 1 on a paged decode wrapper, both returning their log-sum-exp, then merged in
    place (flashinfer.merge_state_in_place), as FlashInfer's MultiLevelCascadeAttentionWrapper does, but with
    the decode kernel for level 1 and only the grouped rows in level 0 (the rest have no shared prefix)."""

    def __init__(self, flashinfer, prefill, decode, num_heads: int, num_kv_heads: int, head_dim: int, page_size):
        self.fi = flashinfer
        self.prefill, self.decode = prefill, decode
        self.num_heads, self.num_kv_heads, self.head_dim, self.page_size = num_heads, num_kv_heads, head_dim, page_size
        self.num_grouped = 0

    def plan(self, cascade: CascadeMetadata, last_page_len, q_data_type, kv_data_type) -> None:
        """`last_page_len(n)`: n ones (page size 1: every page is full)."""
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, self.page_size)
        plan_levels(
            self.prefill,
            self.decode,
            (cascade.shared_qo_indptr_host, cascade.shared_kv_indptr_host, cascade.shared_kv_indices),
            (cascade.unique_kv_indptr_host, cascade.unique_kv_indices),
            heads,
            last_page_len,
            dict(q_data_type=q_data_type, kv_data_type=kv_data_type),
        )
        self.num_grouped = cascade.num_grouped

    def run(self, q: torch.Tensor, paged, **kwargs) -> torch.Tensor:
        """As a wrapper's run (`kwargs`, such as KV scales, go to both levels)."""
        out, lse = self.decode.run(q, paged, return_lse=True, **kwargs)
        n = self.num_grouped
        shared_out, shared_lse = self.prefill.run(q[:n], paged, return_lse=True, **kwargs)
        self.fi.merge_state_in_place(out[:n], lse[:n], shared_out, shared_lse)
        return out


@dataclass
class GraphCascade:
    """A cascade step laid out for the CUDA graph of batch size bs. Level 0 has MAX_GROUPS + 1 fixed entries:
    the step's groups, empty ones (no rows, one slot: slot 0), then one entry holding every other row (the
    ungrouped rows and the graph's padding rows) over slot 0, since the prefill kernel's query length is
    fixed at bs; the merge skips those rows (`merge_mask`). Level 1 has bs rows, a padding row one slot
    (slot 0) as in the plain graphs."""

    shared_qo_indptr_host: np.ndarray  # [MAX_GROUPS + 2]
    shared_kv_indptr_host: np.ndarray  # [MAX_GROUPS + 2]
    unique_kv_indptr_host: np.ndarray  # [bs + 1]
    num_grouped: int  # rows [0, num_grouped) merge level 0 into level 1
    shared_kv_indices: torch.Tensor | None = None  # [shared_kv_indptr_host[-1]], set by the graph's owner


def graph_layout(cascade: CascadeMetadata | None, bs: int, max_groups: int = MAX_GROUPS) -> GraphCascade:
    """The graph layout (host arrays only) of a step's cascade at bucket `bs`; None: the layout a graph is
    captured with (no groups, every row in the last entry, which fixes the kernel's query rows at bs)."""
    if cascade is None:
        sizes, lens, own = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    else:
        sizes = np.diff(cascade.shared_qo_indptr_host).astype(np.int64)
        lens = np.diff(cascade.shared_kv_indptr_host).astype(np.int64)
        own = np.diff(cascade.unique_kv_indptr_host).astype(np.int64)
    k, b, n = len(sizes), len(own), int(sizes.sum())
    assert k <= max_groups and b <= bs, (k, max_groups, b, bs)
    qo_lens = np.concatenate([sizes, np.zeros(max_groups - k, np.int64), [bs - n]])
    kv_lens = np.concatenate([lens, np.ones(max_groups - k + 1, np.int64)])
    unique_lens = np.concatenate([own, np.ones(bs - b, np.int64)])
    cum = lambda x: np.concatenate([[0], np.cumsum(x)])
    return GraphCascade(cum(qo_lens), cum(kv_lens), cum(unique_lens), n)


def fill_graph_buffers(
    cascade: CascadeMetadata | None,
    bs: int,
    unique_buffer: torch.Tensor,
    shared_buffer: torch.Tensor,
    max_groups: int = MAX_GROUPS,
) -> tuple[GraphCascade, torch.Tensor]:
    """A step's graph layout at bucket `bs` (None: the capture's), with its slot indices written into a
    graph's static buffers: level 1's (each row's own slots, then slot 0 for each padding row) into
    `unique_buffer`, level 0's (the groups' prefixes, then slot 0 for each further entry) into
    `shared_buffer`. Returns (the layout, its shared_kv_indices set; level 1's indices)."""
    layout = graph_layout(cascade, bs, max_groups)
    n0 = 0 if cascade is None else len(cascade.shared_kv_indices)
    n1 = 0 if cascade is None else len(cascade.unique_kv_indices)
    m0, m1 = int(layout.shared_kv_indptr_host[-1]), int(layout.unique_kv_indptr_host[-1])
    if cascade is not None:
        shared_buffer[:n0] = cascade.shared_kv_indices
        unique_buffer[:n1] = cascade.unique_kv_indices
    shared_buffer[n0:m0] = 0
    unique_buffer[n1:m1] = 0
    layout.shared_kv_indices = shared_buffer[:m0]
    return layout, unique_buffer[:m1]


class FlashInferGraphCascade:
    """Cascade decode at a fixed batch size inside a CUDA graph: level 1 on the bucket's graph decode wrapper
    (the one its plain graph uses), level 0 on a graph-mode prefill wrapper of MAX_GROUPS + 1 entries over
    all bs query rows (GraphCascade), merged where `merge_mask` is set (flashinfer.merge_state_in_place
    skips the other rows, whose level-0 result over slot 0 is meaningless). Planned before each replay."""

    def __init__(self, flashinfer, prefill, decode, merge_mask: torch.Tensor, heads: tuple, last_page_len):
        self.fi, self.prefill, self.decode, self.merge_mask = flashinfer, prefill, decode, merge_mask
        self.heads, self.last_page_len = heads, last_page_len  # (qo heads, kv heads, head dim, page size)

    def plan(self, layout: GraphCascade, unique_kv_indices: torch.Tensor, q_data_type, kv_data_type) -> None:
        plan_levels(
            self.prefill,
            self.decode,
            (layout.shared_qo_indptr_host, layout.shared_kv_indptr_host, layout.shared_kv_indices),
            (layout.unique_kv_indptr_host, unique_kv_indices),
            self.heads,
            self.last_page_len,
            dict(q_data_type=q_data_type, kv_data_type=kv_data_type),
        )
        self.merge_mask[: layout.num_grouped].fill_(1)
        self.merge_mask[layout.num_grouped :].fill_(0)

    def run(self, q: torch.Tensor, paged, **kwargs) -> torch.Tensor:
        out, lse = self.decode.run(q, paged, return_lse=True, **kwargs)
        shared_out, shared_lse = self.prefill.run(q, paged, return_lse=True, **kwargs)
        self.fi.merge_state_in_place(out, lse, shared_out, shared_lse, mask=self.merge_mask)
        return out
