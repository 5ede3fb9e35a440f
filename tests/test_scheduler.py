"""Scheduling behaviour on a tiny model: prefix sharing inside one burst, identical prompts, budgets."""

import random

import numpy as np
import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from tests.helpers import run_engine, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint("qwen3", tmp_path_factory.mktemp("sched"))


def test_burst_over_shared_prefixes_computes_each_prefix_once(ckpt):
    rng = random.Random(3)
    systems = [[rng.randrange(256) for _ in range(40)] for _ in range(4)]
    prompts = [systems[i % 4] + [rng.randrange(256) for _ in range(4)] for i in range(16)]
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=16, max_num_batched_tokens=64))
    outs = run_engine(engine, prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert all(len(o) == 3 for o in outs)
    unique = 4 * 40 + 16 * 4
    assert engine.stats()["prompt_tokens_computed"] <= 1.1 * unique


def test_identical_prompts_run_together(ckpt):
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=8))
    prompt = list(range(30))
    outs = run_engine(engine, [prompt] * 6, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert all(o == outs[0] for o in outs)
    # all six decode side by side: the run takes about as many steps as one request, not six times as many
    assert engine.stats()["prompt_tokens_computed"] <= 30 + 5 * 1


def test_token_budget_and_batch_limit(ckpt):
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=3, max_num_batched_tokens=10))
    for i in range(5):
        engine.add_request(f"r{i}", list(range(1, 26)), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_work:
        batch = engine.scheduler.schedule()
        if batch is None:
            break
        assert batch.plan.num_tokens <= 10 and len(batch.seqs) <= 3
        engine._in_flight = (batch, engine.runner.launch(batch.plan))
        engine._read_back(*engine._in_flight)
        engine._in_flight = None
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0


# ---- shared-prefix groups for cascade attention (engine/attention/cascade.py) ----


def _decode_steps(sched, seqs, max_steps=200):
    """Drives a Scheduler alone (no model: each kept row 'samples' token 7) and yields every plan once all
    `seqs` decode together."""
    from ringllm.engine.sequence import Status

    for seq in seqs:
        sched.add(seq)
    for _ in range(max_steps):
        batch = sched.schedule()
        assert batch is not None
        for seq, keep in zip(batch.seqs, batch.plan.sample):
            if keep:
                seq.num_pending -= 1
                seq.token_ids.append(7)
        if batch.plan.is_decode and len(batch.seqs) == len(seqs):
            yield batch
        if all(s.status is Status.FINISHED or s.num_output >= s.params.max_tokens for s in seqs):
            return


def _grouping_case(group_shared_prefixes: bool):
    from ringllm.engine.scheduler import Scheduler
    from ringllm.engine.sequence import Sequence

    rng = random.Random(5)
    # three system prompts (distinct first tokens), one too short to be worth a group, and a lone prompt
    systems = {0: 100, 1: 70, 2: 20}
    system_of: list[int | None] = [0, 1, 0, 2, 1, 0, 2, 1, 0]
    bodies = {s: [s + 1] + [rng.randrange(300, 400) for _ in range(n - 1)] for s, n in systems.items()}
    prompts = [bodies[s] + [500 + i, 600 + i, 700 + i] for i, s in enumerate(system_of)]
    prompts.append([9] + [rng.randrange(300, 400) for _ in range(90)])  # shares nothing
    system_of.append(None)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"r{i}", p, params) for i, p in enumerate(prompts)]
    sched = Scheduler(4096, 16, 512, 16, 256, use_radix_cache=True, group_shared_prefixes=group_shared_prefixes)
    return sched, seqs, system_of, systems


def test_decode_rows_sharing_a_cached_prefix_are_grouped_contiguously():
    sched, seqs, system_of, systems = _grouping_case(True)
    steps = list(_decode_steps(sched, seqs))
    assert steps
    for batch in steps:
        plan = batch.plan
        assert sorted(batch.seqs, key=lambda s: s.rid) == sorted(seqs, key=lambda s: s.rid)
        assert [s.row for s in batch.seqs] == plan.rows.tolist()
        index = {id(s): i for i, s in enumerate(seqs)}
        groups = [
            [index[id(s)] for s in batch.seqs[plan.shared_indptr[g] : plan.shared_indptr[g + 1]]]
            for g in range(len(plan.shared_lens))
        ]
        # one group per system prompt long enough to pay (0 and 1); the short one (2) and the lone prompt not
        assert sorted(sorted(g) for g in groups) == [[i for i, s in enumerate(system_of) if s == k] for k in (0, 1)]
        for g, members in enumerate(groups):
            (system,) = {system_of[i] for i in members}
            assert plan.shared_lens[g] == systems[system]
            first = sched.req_to_slot[seqs[members[0]].row, : plan.shared_lens[g]]
            for i in members:  # every member holds the same (the tree's) slots over the shared prefix
                np.testing.assert_array_equal(sched.req_to_slot[seqs[i].row, : plan.shared_lens[g]], first)
                assert plan.shared_lens[g] < seqs[i].num_computed  # the new position is the row's own
        admitted = [s for s in sched.running if s in batch.seqs[plan.shared_indptr[-1] :]]
        assert batch.seqs[plan.shared_indptr[-1] :] == admitted  # the rest keep their admission order
    # the decodes' slot writes follow the reordered rows (the runner's one-kernel decode prepare needs that)
    np.testing.assert_array_equal(steps[-1].plan.slot_rows, steps[-1].plan.rows)


def test_no_groups_without_the_setting_or_the_radix_cache():
    from ringllm.engine.scheduler import Scheduler

    sched, seqs, _, _ = _grouping_case(False)
    for batch in _decode_steps(sched, seqs):
        assert len(batch.plan.shared_lens) == 0 and batch.plan.shared_indptr.tolist() == [0]
        assert batch.seqs == sched.running  # admission order
    assert not Scheduler(64, 4, 64, 4, 64, use_radix_cache=False, group_shared_prefixes=True).group_shared_prefixes


def test_plan_cascade_gathers_each_groups_prefix_once_and_each_rows_own_slots():
    import torch

    from ringllm.engine.attention.cascade import plan_cascade

    table = torch.arange(8 * 50, dtype=torch.int32).view(8, 50)
    rows = np.array([5, 2, 7, 1, 4], np.int32)
    kv_lens = np.array([30, 31, 12, 13, 9])
    indptr, lens = np.array([0, 2, 4], np.int32), np.array([20, 10], np.int32)
    meta = plan_cascade(rows, kv_lens, indptr, lens, table, min_saved_tokens=0)
    assert meta is not None and meta.num_grouped == 4
    assert meta.shared_kv_indptr_host.tolist() == [0, 20, 30]
    np.testing.assert_array_equal(meta.shared_kv_indices, torch.cat([table[5, :20], table[7, :10]]))
    assert meta.unique_kv_indptr_host.tolist() == [0, 10, 21, 23, 26, 35]
    own = [table[5, 20:30], table[2, 20:31], table[7, 10:12], table[1, 10:13], table[4, :9]]
    np.testing.assert_array_equal(meta.unique_kv_indices, torch.cat(own))
    # a step that would save fewer reads than the threshold keeps the plain path
    assert plan_cascade(rows, kv_lens, indptr, lens, table, min_saved_tokens=31) is None


def test_grouped_decode_steps_give_the_same_tokens(ckpt):
    """The torch backend ignores the groups (an optimisation of FlashInfer's), but the reordered decode rows
    must still get their own tokens: the same greedy output with grouping on and off."""
    rng = random.Random(11)
    systems = [[100 + k] + [rng.randrange(256) for _ in range(79)] for k in range(3)]
    prompts = [systems[i % 3] + [rng.randrange(256) for _ in range(5)] for i in range(10)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs, grouped_steps = {}, {}
    for off in (False, True):
        engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=16, disable_cascade_attention=off, seed=1))
        schedule, count = engine.scheduler.schedule, [0]

        def counting(schedule=schedule, count=count):
            batch = schedule()
            count[0] += batch is not None and len(batch.plan.shared_lens) > 0
            return batch

        engine.scheduler.schedule = counting
        outs[off] = run_engine(engine, prompts, params)
        grouped_steps[off] = count[0]
        engine.close()
    assert grouped_steps[True] == 0 and grouped_steps[False] >= 3
    assert outs[False] == outs[True]


def _ragged_cascade_case(num_slots=1024):
    """Ragged groups (3, 1 and 5 rows sharing 30, 6 and 100 slots, then 2 rows sharing nothing) in request
    rows in no particular order: (each row's whole slot list, plan_cascade's metadata, float64 queries
    [rows, H, D], attend(q_row, slot indices) -> (out [H, D], log-sum-exp [H]) over float64 K/V)."""
    import torch

    from ringllm.engine.attention.cascade import plan_cascade

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
    meta = plan_cascade(rows, kv_lens, indptr, np.array(shared, np.int32), table, min_saved_tokens=0)
    assert meta is not None
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
    import torch

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
    import torch

    from ringllm.engine.attention.cascade import MAX_GROUPS, fill_graph_buffers

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
    from ringllm.engine.attention.cascade import MAX_GROUPS, graph_layout

    lay = graph_layout(None, 32)
    assert lay.shared_qo_indptr_host.tolist() == [0] * (MAX_GROUPS + 1) + [32]
    assert lay.shared_kv_indptr_host.tolist() == list(range(MAX_GROUPS + 2))
    assert lay.unique_kv_indptr_host.tolist() == list(range(33)) and lay.num_grouped == 0


def test_at_most_max_groups_groups_are_kept_those_saving_most_first():
    """System prompt 0 (4 sequences x 100 positions: saves 300 reads) before system prompt 1 (3 x 70: 140),
    though system prompt 1's sequences come first; with a cap of one group only system prompt 0's is kept and
    the other sequences keep their order, ungrouped."""
    from ringllm.engine.scheduler import _group_by_shared_prefix

    sched, seqs, system_of, systems = _grouping_case(True)
    batch = next(_decode_steps(sched, seqs))
    system = {id(s): system_of[i] for i, s in enumerate(seqs)}
    decodes = sorted(batch.seqs, key=lambda s: system[id(s)] != 1)  # system prompt 1's first
    ordered, (indptr, lens) = _group_by_shared_prefix(decodes, max_groups=2)
    assert lens.tolist() == [systems[0], systems[1]] and np.diff(indptr).tolist() == [4, 3]
    ordered, (indptr, lens) = _group_by_shared_prefix(decodes, max_groups=1)
    assert lens.tolist() == [systems[0]] and indptr.tolist() == [0, 4]
    assert {system[id(s)] for s in ordered[:4]} == {0}
    assert ordered[4:] == [s for s in decodes if system[id(s)] != 0]
