"""The start-up warm-up (engine/runner/warmup.py) on the CPU: the steps it plans for an engine's limits, that it
really runs each of them (counted at the runner's public `forward`), that it leaves no request, cached prefix,
counter or sampler state behind, and that an engine started with it gives exactly the results of one started
without it. What it compiles on a GPU is measured there (scripts/nano_account.py: first run against second)."""

import pytest
import torch

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from ringllm.engine.runner.cuda_graph import batch_buckets
from ringllm.engine.runner.warmup import FEATURES, plan_warmup, wants_warmup, warm_up
from tests.helpers import free_port, tiny_checkpoint

SMALL = dict(device="cpu", max_bs=8, max_num_batched_tokens=64, kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint("qwen3", tmp_path_factory.mktemp("warmup"))


def test_plan_covers_every_bucket_and_the_token_budget():
    config = EngineConfig(max_bs=256, max_num_batched_tokens=16384)
    plan = plan_warmup(config, max_seq_len=4096, num_slots=600_000)
    assert plan.prefill_tokens[:2] == [16384, 16383]  # the full budget first (the allocator grows once)
    assert plan.prefill_tokens == sorted(plan.prefill_tokens, reverse=True)
    assert {16, 32, 1024, 8192} <= set(plan.prefill_tokens)
    buckets = batch_buckets(256)
    assert set(plan.decode_batches) == set(buckets) | {b - 1 for b in buckets if b > 1}
    assert plan.decode_batches == sorted(plan.decode_batches, reverse=True)
    assert plan.staircase_prompt == 8
    assert plan.features == list(FEATURES)


def test_plan_stays_within_a_small_pool_and_context():
    config = EngineConfig(max_bs=256, max_num_batched_tokens=16384)
    plan = plan_warmup(config, max_seq_len=4096, num_slots=3000)
    assert plan.prefill_tokens[0] == 1500  # half the pool at most
    # every staircase request holds prompt + steps + 1 slots while the largest step runs
    largest = plan.decode_batches[0]
    assert largest * (plan.staircase_prompt + len(plan.decode_batches) + 1) <= 1500
    assert largest < 256 and plan.decode_batches[-1] == 1
    short = plan_warmup(config, max_seq_len=20, num_slots=600_000)
    assert short.prefill_tokens[0] == 19 * 256  # max_bs requests of at most 19 positions each
    assert short.staircase_prompt + len(short.decode_batches) + 1 <= 20
    tiny = plan_warmup(config, max_seq_len=4096, num_slots=3)
    assert tiny.prefill_tokens == [1] and tiny.decode_batches == []


def test_wants_warmup_on_a_gpu_by_default():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert wants_warmup(EngineConfig(), cuda) and not wants_warmup(EngineConfig(), cpu)
    assert wants_warmup(EngineConfig(warmup="on"), cpu)
    assert not wants_warmup(EngineConfig(warmup="off"), cuda)
    with pytest.raises(ValueError, match="warmup must be one of"):
        EngineConfig(warmup="sometimes")


def test_warmup_runs_the_steps_it_plans_and_leaves_nothing(ckpt):
    engine = Engine(EngineConfig(model=str(ckpt), warmup="off", **SMALL))
    try:
        steps = []
        forward = engine.runner.forward

        def counted(plan):
            steps.append(plan)
            return forward(plan)

        engine.runner.forward = counted
        free = engine.scheduler.allocator.num_free
        report = warm_up(engine)
        plan = report.plan
        prefills = [p.num_tokens for p in steps if not p.is_decode]
        decodes = [len(p.rows) for p in steps if p.is_decode]
        # one prefill step per planned size, then each staircase's admission step (all its prompts at once)
        staircase = plan.decode_batches[0] * plan.staircase_prompt
        assert prefills == plan.prefill_tokens + [staircase, staircase]
        assert decodes == plan.decode_batches * 2  # the plain staircase, then the one with sampling features
        assert plan.decode_batches == [8, 7, 4, 3, 2, 1]
        # the second staircase's rows carry every feature, and the first row prompt logprobs
        admitted = [p for p in steps if p.new_params][-1].new_params
        assert admitted[0].prompt_logprobs == 2
        assert {p.top_k for p in admitted} == {-1, 20} and any(p.logprobs == 5 for p in admitted)
        assert any(p.repetition_penalty != 1.0 for p in admitted) and any(p.logit_bias for p in admitted)
        assert [p.name for p in report.parts] == ["prefill", "decode", "sampling"]
        assert all(p.steps > 0 and p.seconds > 0 for p in report.parts)
        # nothing left behind
        assert not engine.has_work and not engine.seqs
        assert engine.scheduler.allocator.num_free == free
        stats = engine.stats()
        assert stats.pop("kv_slots_total") == free and set(stats.values()) == {0}  # counters, cache, queue
        table = engine.runner.row_table
        assert table.all_plain and not any(table.held[name] for name in ("logprobs", "top_k", "prompt_logprobs"))
    finally:
        engine.close()


WORKLOAD = [
    SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.9, ignore_eos=True),  # unseeded: the sampler's generator
    SamplingParams(max_tokens=6, temperature=0.9, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.8, top_k=5, top_p=0.8, ignore_eos=True),
    SamplingParams(max_tokens=6, temperature=0.8, repetition_penalty=1.3, logprobs=3, ignore_eos=True),
]


def _run(engine: Engine) -> dict:
    outs: dict = {}
    for i, params in enumerate(WORKLOAD):
        engine.add_request(f"r{i}", [5 + i, 9, 2, 7, 1, 3][: 3 + i % 3], params)
    while engine.has_work:
        for o in engine.step():
            if o.token_id is not None:
                outs.setdefault(o.rid, []).append((o.token_id, o.logprob, o.top_logprobs))
    return outs


def test_an_engine_warmed_up_gives_the_results_of_one_that_was_not(ckpt):
    results = []
    for warmup in ("on", "off"):
        engine = Engine(EngineConfig(model=str(ckpt), warmup=warmup, **SMALL))
        try:
            assert (engine.warmup is not None) == (warmup == "on")
            results.append((_run(engine), _run(engine), engine.stats()))
        finally:
            engine.close()
    assert results[0] == results[1]
    assert len(results[0][0]) == len(WORKLOAD) and all(len(v) == 6 for v in results[0][0].values())


def test_a_failed_warmup_stops_the_engine(ckpt, monkeypatch):
    closed = []
    monkeypatch.setattr(Engine, "close", lambda self: closed.append(True))

    def refuse(engine):
        raise RuntimeError("warm-up failed")

    monkeypatch.setattr("ringllm.engine.engine.warm_up", refuse)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        Engine(EngineConfig(model=str(ckpt), warmup="on", **SMALL))
    assert closed == [True]


def test_warmup_refuses_an_engine_with_requests(ckpt):
    engine = Engine(EngineConfig(model=str(ckpt), warmup="off", **SMALL))
    try:
        engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
        with pytest.raises(RuntimeError, match="before the engine takes requests"):
            warm_up(engine)
    finally:
        engine.close()


def test_worker_ranks_forget_the_warmup_too(ckpt):
    """Under pipeline parallelism the sampler is on the last stage, a worker process: the warm-up's end reaches
    it (a forget_requests control message), so its unseeded noise starts where an engine without it does."""
    workload = [
        SamplingParams(max_tokens=5, temperature=0.9, ignore_eos=True, top_k=8 if i % 2 else -1) for i in range(3)
    ]
    results = []
    for warmup in ("on", "off"):
        config = EngineConfig(model=str(ckpt), warmup=warmup, pp_size=2, nccl_port=free_port(), **SMALL)
        engine = Engine(config)
        try:
            for i, params in enumerate(workload):
                engine.add_request(f"p{i}", [3 + i, 1, 4, 1, 5], params)
            outs: dict = {}
            while engine.has_work:
                for o in engine.step():
                    outs.setdefault(o.rid, []).append(o.token_id)
            results.append(outs)
        finally:
            engine.close()
    assert results[0] == results[1] and sum(len(v) for v in results[0].values()) == 15
