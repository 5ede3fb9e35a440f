"""Scheduling behaviour on a tiny model: prefix sharing inside one burst, identical prompts, budgets."""

import random

import numpy as np
import pytest

from engine import EngineConfig, SamplingParams
from engine.engine import Engine
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
    from engine.sequence import Status

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
    from engine.scheduler import Scheduler
    from engine.sequence import Sequence

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
        assert sorted(sorted(g) for g in groups) == [
            [i for i, s in enumerate(system_of) if s == k] for k in (0, 1)
        ]
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
    from engine.scheduler import Scheduler

    sched, seqs, _, _ = _grouping_case(False)
    for batch in _decode_steps(sched, seqs):
        assert len(batch.plan.shared_lens) == 0 and batch.plan.shared_indptr.tolist() == [0]
        assert batch.seqs == sched.running  # admission order
    assert not Scheduler(64, 4, 64, 4, 64, use_radix_cache=False, group_shared_prefixes=True).group_shared_prefixes


def test_plan_cascade_gathers_each_groups_prefix_once_and_each_rows_own_slots():
    import torch

    from engine.attention.cascade import plan_cascade

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
        engine = Engine(
            EngineConfig(model=str(ckpt), device="cpu", max_bs=16, disable_cascade_attention=off, seed=1)
        )
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


def test_cascade_levels_merged_by_log_sum_exp_equal_attention_over_each_whole_row():
    """The math FlashInfer's cascade runs, in float64 on plan_cascade's indices for ragged groups (3, 1 and 5
    rows sharing 30, 6 and 100 slots, then 2 rows sharing nothing): level 0 over the group's prefix, level 1
    over the row's own slots, merged by their log-sum-exp, equals attention over the row's whole slot list."""
    import torch

    from engine.attention.cascade import plan_cascade

    rng = np.random.default_rng(1)
    H, Hkv, D, num_slots = 4, 2, 8, 1024
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
