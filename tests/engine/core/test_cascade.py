"""Cascade grouping (engine/core/cascade.py), on the host: which decode rows share a cached prefix, how many
groups a step keeps, when cascade pays; and, on a tiny model, that the reordered rows keep their tokens."""

import random

import numpy as np
import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.core.cascade import (
    MAX_GROUPS,
    MIN_SAVED_TOKENS,
    MIN_SAVED_TOKENS_GRAPH,
    group_by_shared_prefix,
    saved_tokens,
    worth_cascading,
)
from ringllm.engine.core.scheduler import Scheduler
from ringllm.engine.core.sequence import Sequence, Status
from ringllm.engine.engine import Engine
from tests.helpers import run_engine, tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint("qwen3", tmp_path_factory.mktemp("cascade"))


def _decode_steps(sched, seqs, max_steps=200):
    """Drives a Scheduler alone (no model: each kept row 'samples' token 7) and yields every plan once all
    `seqs` decode together."""
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
    sched, seqs, _, _ = _grouping_case(False)
    for batch in _decode_steps(sched, seqs):
        assert len(batch.plan.shared_lens) == 0 and batch.plan.shared_indptr.tolist() == [0]
        assert batch.seqs == sched.running  # admission order
    assert not Scheduler(64, 4, 64, 4, 64, use_radix_cache=False, group_shared_prefixes=True).group_shared_prefixes


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


def test_at_most_max_groups_groups_are_kept_those_saving_most_first():
    """System prompt 0 (4 sequences x 100 positions: saves 300 reads) before system prompt 1 (3 x 70: 140),
    though system prompt 1's sequences come first; with a cap of one group only system prompt 0's is kept and
    the other sequences keep their order, ungrouped."""
    sched, seqs, system_of, systems = _grouping_case(True)
    batch = next(_decode_steps(sched, seqs))
    system = {id(s): system_of[i] for i, s in enumerate(seqs)}
    decodes = sorted(batch.seqs, key=lambda s: system[id(s)] != 1)  # system prompt 1's first
    ordered, (indptr, lens) = group_by_shared_prefix(decodes, max_groups=2)
    assert lens.tolist() == [systems[0], systems[1]] and np.diff(indptr).tolist() == [4, 3]
    ordered, (indptr, lens) = group_by_shared_prefix(decodes, max_groups=1)
    assert lens.tolist() == [systems[0]] and indptr.tolist() == [0, 4]
    assert {system[id(s)] for s in ordered[:4]} == {0}
    assert ordered[4:] == [s for s in decodes if system[id(s)] != 0]


def test_a_step_cascades_only_where_it_saves_enough_reads():
    """Eagerly every group counts against MIN_SAVED_TOKENS; in a CUDA graph only the first MAX_GROUPS groups
    (the rest of the rows go ungrouped) against MIN_SAVED_TOKENS_GRAPH."""
    indptr, lens = np.array([0, 2, 4], np.int32), np.array([20, 10], np.int32)
    assert saved_tokens(indptr, lens) == 30
    assert worth_cascading(indptr, lens, in_graph=False) is None  # 30 reads saved: plain decode is cheaper
    big = np.full(MAX_GROUPS + 4, 4096, np.int32)  # groups of 2 rows, each sharing 4,096 positions
    big_indptr = np.arange(0, 2 * len(big) + 1, 2, dtype=np.int32)
    eager = worth_cascading(big_indptr, big, in_graph=False)
    assert eager is not None and len(eager[1]) == MAX_GROUPS + 4
    graph = worth_cascading(big_indptr, big, in_graph=True)
    assert (
        graph is not None and len(graph[1]) == MAX_GROUPS and graph[0].tolist() == big_indptr[: MAX_GROUPS + 1].tolist()
    )
    # between the two floors: a graph step cascades, an eager one does not
    one = np.array([0, 2], np.int32)
    between = np.array([MIN_SAVED_TOKENS_GRAPH], np.int32)
    assert MIN_SAVED_TOKENS_GRAPH < MIN_SAVED_TOKENS
    assert worth_cascading(one, between, in_graph=True) is not None
    assert worth_cascading(one, between, in_graph=False) is None
    assert worth_cascading(np.zeros(1, np.int32), np.empty(0, np.int32), in_graph=True) is None
