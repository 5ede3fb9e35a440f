"""The batch-1 host shortcuts (CPU): the scheduler's bulk decode plan, the runner's logprobs count, the
sampler's scratch size. The pinned rings (engine/staging.py, step_result.ResultRing) need CUDA: tests/test_gpu.py."""

import numpy as np
import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from ringllm.engine.kernels import _sample_chunk, sample_scratch_size
from ringllm.engine.scheduler import Scheduler
from ringllm.engine.sequence import Sequence
from tests.helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint("qwen3", tmp_path_factory.mktemp("host-path"))


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


def test_logprobs_reach_a_request_admitted_after_plain_ones(ckpt):
    """The runner skips the per-step logprobs lookup while no request row holds logprobs; a later request with
    logprobs still gets them, a plain one beside it does not, and a plain one after both finished neither."""
    engine = Engine(EngineConfig(model=str(ckpt), device="cpu", max_bs=4))
    try:
        outs: dict[str, list] = {}

        def run(requests):
            for rid, params in requests:
                engine.add_request(rid, [1, 2, 3, 4], params)
                outs[rid] = []
            while engine.has_work:
                for o in engine.step():
                    if o.token_id is not None:
                        outs[o.rid].append(o)

        plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        run([("a", plain)])
        assert engine.runner.num_logprob_rows == 0
        run([("b", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)), ("c", plain)])
        run([("d", plain)])
        assert all(o.logprob is not None and len(o.top_logprobs) == 2 for o in outs["b"])
        assert all(o.logprob is None for rid in "acd" for o in outs[rid])
        assert [len(outs[r]) for r in "abcd"] == [4] * 4
        assert [o.token_id for o in outs["b"]] == [o.token_id for o in outs["a"]]  # greedy either way
    finally:
        engine.close()


@pytest.mark.parametrize("vocab", [256, 32_000, 151_936])
@pytest.mark.parametrize("max_rows", [1, 8, 31, 32, 33, 256])
def test_sample_scratch_holds_the_chunk_winners_of_every_batch_size(vocab, max_rows):
    size = sample_scratch_size(max_rows, vocab)
    need = [b * -(-vocab // _sample_chunk(b)) for b in range(1, max_rows + 1)]
    assert max(need) == size
