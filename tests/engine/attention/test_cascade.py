"""Cascade attention's indices and math on the CPU (engine/attention/cascade.py): plan_cascade's gather, and
levels merged by log-sum-exp equal attention over each whole row, eagerly and in a CUDA graph's fixed layout
(simulated in float64). FlashInfer runs them in test_cascade_gpu.py."""

import numpy as np
import pytest
import torch

from ringllm.engine.attention.cascade import fill_graph_buffers, graph_layout, plan_cascade
from ringllm.engine.core.cascade import MAX_GROUPS


def test_plan_cascade_gathers_each_groups_prefix_once_and_each_rows_own_slots():
    table = torch.arange(8 * 50, dtype=torch.int32).view(8, 50)
    rows = np.array([5, 2, 7, 1, 4], np.int32)
    kv_lens = np.array([30, 31, 12, 13, 9])
    indptr, lens = np.array([0, 2, 4], np.int32), np.array([20, 10], np.int32)
    meta = plan_cascade(rows, kv_lens, indptr, lens, table)
    assert meta.num_grouped == 4
    assert meta.shared_kv_indptr_host.tolist() == [0, 20, 30]
    np.testing.assert_array_equal(meta.shared_kv_indices, torch.cat([table[5, :20], table[7, :10]]))
    assert meta.unique_kv_indptr_host.tolist() == [0, 10, 21, 23, 26, 35]
    own = [table[5, 20:30], table[2, 20:31], table[7, 10:12], table[1, 10:13], table[4, :9]]
    np.testing.assert_array_equal(meta.unique_kv_indices, torch.cat(own))


def _ragged_cascade_case(num_slots=1024):
    """Ragged groups (3, 1 and 5 rows sharing 30, 6 and 100 slots, then 2 rows sharing nothing) in request
    rows in no particular order: (each row's whole slot list, plan_cascade's metadata, float64 queries
    [rows, H, D], attend(q_row, slot indices) -> (out [H, D], log-sum-exp [H]) over float64 K/V)."""
    rng = np.random.default_rng(1)
    H, Hkv, D = 4, 2, 8
    free = iter(rng.permutation(np.arange(1, num_slots)).tolist())
    sizes, shared = [3, 1, 5], [30, 6, 100]
    tails = [1, 7, 13, 2, 1, 40, 3, 9, 50, 17, 1]
    prefixes = [[next(free) for _ in range(n)] for n in shared]
    slot_lists = [p for p, s in zip(prefixes, sizes) for _ in range(s)] + [[], []]
    slot_lists = [p + [next(free) for _ in range(t)] for p, t in zip(slot_lists, tails)]
    rows = rng.permutation(len(slot_lists)).astype(np.int32) + 2
    table = torch.zeros(len(slot_lists) + 2, 256, dtype=torch.int32)
    for r, slots in zip(rows, slot_lists):
        table[r, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    kv_lens = np.array([len(s) for s in slot_lists])
    meta = plan_cascade(rows, kv_lens, indptr, np.array(shared, np.int32), table)
    gen = torch.Generator().manual_seed(0)
    K, V = (torch.randn(num_slots, Hkv, D, generator=gen, dtype=torch.float64) for _ in "kv")
    q = torch.randn(len(slot_lists), H, D, generator=gen, dtype=torch.float64)

    def attend(qi, idx):  # (out [H, D], log-sum-exp [H])
        k, v = (x[idx.long()].repeat_interleave(H // Hkv, 1) for x in (K, V))
        s = torch.einsum("hd,nhd->hn", qi, k) / D**0.5
        return torch.einsum("hn,nhd->hd", s.softmax(-1), v), s.logsumexp(-1)

    return slot_lists, meta, q, attend


def test_cascade_levels_merged_by_log_sum_exp_equal_attention_over_each_whole_row():
    """The math FlashInfer's cascade runs, in float64 on plan_cascade's indices for ragged groups (3, 1 and 5
    rows sharing 30, 6 and 100 slots, then 2 rows sharing nothing): level 0 over the group's prefix, level 1
    over the row's own slots, merged by their log-sum-exp, equals attention over the row's whole slot list."""
    slot_lists, meta, q, attend = _ragged_cascade_case()
    for i, slots in enumerate(slot_lists):
        own = meta.unique_kv_indices[meta.unique_kv_indptr_host[i] : meta.unique_kv_indptr_host[i + 1]]
        out, lse = attend(q[i], own)
        if i < meta.num_grouped:
            g = int(np.searchsorted(meta.shared_qo_indptr_host, i, side="right")) - 1
            kvp = meta.shared_kv_indptr_host
            out0, lse0 = attend(q[i], meta.shared_kv_indices[kvp[g] : kvp[g + 1]])
            w0, w1 = (lse0 - torch.logaddexp(lse0, lse)).exp(), (lse - torch.logaddexp(lse0, lse)).exp()
            out = w0[:, None] * out0 + w1[:, None] * out
        ref, _ = attend(q[i], torch.tensor(slots))
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bs, max_groups", [(16, None), (11, 3)], ids=["padded-fewer-groups", "full-all-entries"])
def test_graph_layout_levels_merged_where_masked_equal_attention_over_each_whole_row(bs, max_groups):
    """A CUDA graph's cascade step (cascade.graph_layout) simulated in float64: level 0 over every one of the
    MAX_GROUPS + 1 fixed entries (the 3 groups, empty ones, then the entry of the ungrouped and padding rows
    over slot 0), level 1 over bs rows (padding rows over slot 0), the buffers padded with slot 0 as
    DecodeGraphs fills them, and the merge only where the mask is set: the step's 11 rows equal attention
    over each whole row. At bucket 16 with 5 padding rows and fewer groups than entries, and at bucket 11 with
    every entry a group but the last (2 ungrouped rows)."""
    slot_lists, meta, q, attend = _ragged_cascade_case()
    max_groups = max_groups or MAX_GROUPS
    b = len(slot_lists)
    # the graph's static buffers, holding an earlier step's slots (-1 here: no slot)
    unique_static, shared_static = (torch.full((n,), -1, dtype=torch.int32) for n in (1000, 500))
    lay, own_buf = fill_graph_buffers(meta, bs, unique_static, shared_static, max_groups)
    shared_buf = lay.shared_kv_indices
    qo, kv, own = lay.shared_qo_indptr_host, lay.shared_kv_indptr_host, lay.unique_kv_indptr_host
    assert len(qo) == len(kv) == max_groups + 2 and qo[-1] == bs and len(own) == bs + 1
    assert (np.diff(kv) >= 1).all() and (np.diff(own) >= 1).all()  # every entry and row reads a slot
    assert lay.num_grouped == 9 and qo[3] == 9 and (qo[3:-1] == 9).all()  # empty entries past the groups
    assert len(shared_buf) == kv[-1] and len(own_buf) == own[-1] and (shared_buf >= 0).all() and (own_buf >= 0).all()
    q = torch.cat([q, torch.randn(bs - b, *q.shape[1:], dtype=q.dtype)])  # padding rows: anything
    mask = np.arange(bs) < lay.num_grouped
    for i in range(bs):
        out, lse = attend(q[i], own_buf[own[i] : own[i + 1]])
        e = int(np.searchsorted(qo, i, side="right")) - 1  # the level-0 entry whose rows hold i
        out0, lse0 = attend(q[i], shared_buf[kv[e] : kv[e + 1]])
        assert (e < 3) == mask[i]
        if mask[i]:
            w0, w1 = (lse0 - torch.logaddexp(lse0, lse)).exp(), (lse - torch.logaddexp(lse0, lse)).exp()
            out = w0[:, None] * out0 + w1[:, None] * out
        if i < b:
            ref, _ = attend(q[i], torch.tensor(slot_lists[i]))
            torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_graph_layout_of_a_capture_puts_every_row_in_the_last_entry():
    """A cascade graph is captured with no groups: level 0's query rows (fixed at the first plan) are all bs."""
    lay = graph_layout(None, 32)
    assert lay.shared_qo_indptr_host.tolist() == [0] * (MAX_GROUPS + 1) + [32]
    assert lay.shared_kv_indptr_host.tolist() == list(range(MAX_GROUPS + 2))
    assert lay.unique_kv_indptr_host.tolist() == list(range(33)) and lay.num_grouped == 0
