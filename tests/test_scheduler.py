"""Scheduling behaviour on a tiny model: prefix sharing inside one burst, identical prompts, budgets."""

import random

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
