"""The scheduler (engine/core/scheduler.py): on its own (no model: each kept row 'samples' a token at once) and
driving a tiny model: prefix sharing inside one burst, identical prompts, budgets, the bulk decode plan."""

import random

import numpy as np
import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.core.scheduler import Scheduler
from ringllm.engine.core.sequence import Sequence
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
    schedule, plans = engine.scheduler.schedule, []

    def recorded():
        batch = schedule()
        if batch is not None:
            plans.append((batch.plan.num_tokens, len(batch.seqs)))
        return batch

    engine.scheduler.schedule = recorded
    outs = run_engine(engine, [list(range(1, 26))] * 5, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o) for o in outs] == [4] * 5
    assert plans and all(tokens <= 10 and rows <= 3 for tokens, rows in plans), plans
    assert max(tokens for tokens, _ in plans) == 10  # the budget is used, not just respected
    assert engine.stats()["running"] == engine.stats()["waiting"] == 0
    engine.close()


def _step(sched: Scheduler):
    """One schedule; each kept row 'samples' token 7 at once (no model)."""
    batch = sched.schedule()
    assert batch is not None
    for seq, keep in zip(batch.seqs, batch.plan.sample):
        if keep:
            seq.num_pending -= 1
            seq.token_ids.append(7)
    return batch


def test_bulk_decode_plan_holds_each_sequences_row_position_and_new_slot():
    """A decode-only step reuses the bulk placement's arrays for rows/starts and its one write for the slot
    lists; a step that also admits a prompt builds them per sequence. Both describe every sequence exactly."""
    sched = Scheduler(1000, 4, 256, 4, 64, use_radix_cache=True)
    seqs = [Sequence(f"s{i}", list(range(1, 6 + 3 * i)), SamplingParams(max_tokens=6)) for i in range(2)]
    for s in seqs:
        sched.add(s)
    plans = []
    for i in range(4):
        if i == 2:  # a third request arrives: its prompt shares the step with two decodes
            seqs.append(Sequence("late", list(range(1, 20)), SamplingParams(max_tokens=6)))
            sched.add(seqs[-1])
        plans.append((_step(sched), [s.num_computed for s in seqs]))
    decode_only = [(b, c) for b, c in plans if b.plan.is_decode]
    mixed = [(b, c) for b, c in plans if not b.plan.is_decode and b.plan.num_decodes]
    assert decode_only and mixed
    for batch, computed in decode_only + mixed:
        p = batch.plan
        for arr in (p.rows, p.starts, p.lens, p.slot_rows, p.slot_pos, p.slot_ids):
            assert arr.dtype == np.int32
        ends = np.array([computed[seqs.index(s)] for s in batch.seqs])
        assert p.rows.tolist() == [s.row for s in batch.seqs]
        assert (p.starts + p.lens).tolist() == ends.tolist() and p.sample.all()
        d = p.num_decodes
        assert (p.lens[:d] == 1).all()
        table = sched.req_to_slot
        # each decode's new slot is written once, at its position, and is the table's slot there
        assert p.slot_rows[:d].tolist() == p.rows[:d].tolist() and p.slot_pos[:d].tolist() == p.starts[:d].tolist()
        assert p.slot_ids[:d].tolist() == table[p.rows[:d], p.starts[:d]].tolist()
    # the decode-only plans share the bulk arrays (what lets the runner skip its array comparisons)
    assert all(b.plan.slot_rows is b.plan.rows and b.plan.slot_pos is b.plan.starts for b, _ in decode_only)


@pytest.mark.parametrize("by_priority", [False, True])
def test_by_priority_the_queue_is_ordered_by_priority_then_arrival(by_priority):
    """Two rows a step: first come first served admits the first two arrivals; by priority the lowest values
    first, equal priorities in arrival order, whatever the arrival order of the rest."""
    sched = Scheduler(1000, 8, 256, 2, 64, use_radix_cache=False, by_priority=by_priority)
    for name, priority in [("a", 0), ("b", 5), ("c", -1), ("d", 0)]:
        sched.add(Sequence(name, [1, 2, 3], SamplingParams(max_tokens=8, priority=priority)))
    admitted = [[s.rid for s in _step(sched).seqs] for _ in range(2)]
    assert admitted == ([["a", "b"], ["a", "b"]] if not by_priority else [["c", "a"], ["c", "a"]])
    assert [s.rid for s in sched.waiting] == (["c", "d"] if not by_priority else ["d", "b"])


@pytest.mark.parametrize("by_priority", [False, True])
def test_short_of_slots_the_lowest_priority_is_preempted(by_priority):
    """A low-priority request runs, a high-priority one arrives later; then the slots run out for their decodes.
    First come first served preempts the later arrival; by priority the low-priority one is preempted, even
    though it came first, and it goes back to the queue behind nothing of higher priority."""
    sched = Scheduler(11, 4, 256, 4, 64, use_radix_cache=False, by_priority=by_priority)  # 10 slots
    low, high = (
        Sequence(n, [1, 2, 3, 4], SamplingParams(max_tokens=8, priority=p)) for n, p in [("low", 5), ("high", 0)]
    )
    sched.add(low)
    _step(sched)  # low: its prompt (4 slots)
    sched.add(high)
    _step(sched)  # low decodes (1 slot), high's prompt (4 slots, one kept for low's next decode)
    assert sched.allocator.num_free == 1
    batch = _step(sched)  # two decodes, one slot
    preempted = high if not by_priority else low
    assert [s.rid for s in batch.seqs] == [("low" if preempted is high else "high")]
    assert list(sched.waiting) == [preempted] and sched.num_preemptions == 1


def test_the_engine_takes_priorities_only_when_it_schedules_by_them(ckpt):
    """A request's priority needs --scheduling-policy priority (vLLM refuses it otherwise); then the most urgent
    of a queue that arrived together is served first, and every request still finishes."""
    from ringllm.engine.engine import RequestError

    urgent = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, priority=-5)
    fcfs = Engine(EngineConfig(model=str(ckpt), device="cpu"))
    try:
        with pytest.raises(RequestError, match="priority -5"):
            fcfs.add_request("r", [1, 2, 3], urgent)
    finally:
        fcfs.close()
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=1, scheduling_policy="priority"))
    try:
        for i, params in enumerate([SamplingParams(max_tokens=3, ignore_eos=True)] * 2 + [urgent]):
            engine.add_request(f"r{i}", [1, 2, 3 + i], params)
        first = []
        while engine.has_work:
            first += [o.rid for o in engine.step() if o.finish_reason and o.rid not in first]
        assert first == ["r2", "r0", "r1"]
    finally:
        engine.close()


def test_outputs_report_the_prompt_tokens_the_radix_cache_served(ckpt):
    """num_cached_tokens (usage's cached_tokens): the prefix the cache held when the request was admitted, the
    same in every output, not the positions the request itself put in the cache as it ran."""
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=4))
    prompt = list(range(1, 41))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def cached(rid: str, ids: list[int]) -> set[int]:
        engine.add_request(rid, ids, params)
        seen = set()
        while engine.has_work:
            seen |= {o.num_cached_tokens for o in engine.step() if o.rid == rid and o.token_id is not None}
        return seen

    assert cached("first", prompt) == {0}
    assert cached("again", prompt) == {39}  # all but the last prompt token, which is computed for its logits
    assert cached("longer", prompt + [7, 8, 9]) == {40}  # the whole earlier prompt
    engine.close()
