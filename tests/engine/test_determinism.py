"""Deterministic inference on the CPU (torch attention backend): 64 requests give the same tokens and the same
logprobs, bit for bit, alone and mixed into batches of other sizes and orders, chunked, with and without
radix-cache hits (on prompt and on generated positions), preempted; seeded temperature-1 requests reproduce
across engines and batch compositions. Without the mode the same comparison fails (MKL computes 1, 2-3 and 4+
rows with different kernels), so the assertions have teeth on this machine. The GPU twin is
test_determinism_gpu.py."""

import random

import pytest
import torch

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.determinism import MIN_CPU_ROWS, linear, request_params
from tests.engine.determinism_cases import (
    NUM_BASE,
    SCENARIOS,
    alone,
    base_prompts,
    continuations,
    engine,
    generate,
    mismatches,
    random_groups,
    run_scenario,
)
from tests.helpers import tiny_checkpoint

VOCAB = 256
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_checkpoint("qwen3", tmp_path_factory.mktemp("determinism"), vocab=VOCAB)


@pytest.fixture(scope="module")
def greedy(model):
    """The 64 prompts and each one's output run alone, cold (no radix cache), in deterministic mode."""
    eng = engine(model, device="cpu", disable_radix_cache=True)
    try:
        base = base_prompts(VOCAB)
        first = alone(eng, base, [GREEDY] * NUM_BASE)
        more = continuations(base, first, VOCAB)
        prompts = base + more
        return prompts, first + alone(eng, more, [GREEDY] * len(more))
    finally:
        eng.close()


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_outputs_do_not_depend_on_the_batch_the_chunking_or_the_cache(model, greedy, scenario):
    prompts, reference = greedy
    runs, stats = run_scenario(model, scenario, prompts, [GREEDY] * len(prompts), device="cpu")
    for got in runs:
        assert mismatches(reference, got) == []
    if scenario == "warm-cache":
        # every prompt of the second run but its last id, and the continuations' generated positions
        assert stats["prefix_cache_hit_tokens"] >= sum(len(p) - 1 for p in prompts)
    if scenario == "preempted":
        assert stats["preemptions"] > 0


def test_without_the_mode_the_same_comparison_fails(model, greedy):
    """The default mode is not batch-invariant here: the logprobs of requests run alone and run together
    differ (a greedy token rarely flips on this model; a rounding difference always shows in the logprob)."""
    prompts, _ = greedy
    params = [GREEDY] * len(prompts)
    eng = engine(model, device="cpu", disable_radix_cache=True, enable_deterministic_inference=False)
    try:
        solo = alone(eng, prompts[:16], params[:16])
        together = generate(eng, prompts[:16], params[:16], [list(range(16))])
    finally:
        eng.close()
    assert len(mismatches(solo, together)) > 0


def _sampled(seeded: bool) -> list[SamplingParams]:
    """Temperature 1, half of them with top-k 50 (the reference sampler's filtered path); each with a seed of
    its own, or none (the engine's --seed then)."""
    return [
        SamplingParams(
            max_tokens=8,
            temperature=1.0,
            top_k=50 if i % 2 else -1,
            ignore_eos=True,
            logprobs=0,
            seed=1000 + i if seeded else None,
        )
        for i in range(NUM_BASE)
    ]


@pytest.mark.parametrize("seeded", [True, False], ids=["own-seed", "engine-seed"])
def test_sampled_requests_reproduce_across_engines_and_batches(model, seeded):
    prompts, params = base_prompts(VOCAB), _sampled(seeded)
    eng = engine(model, device="cpu", disable_radix_cache=True, seed=7)
    try:
        reference = alone(eng, prompts, params)
    finally:
        eng.close()
    for groups, extra in (([list(range(NUM_BASE))], dict(max_num_batched_tokens=24)), (random_groups(48, 4), {})):
        eng = engine(model, device="cpu", seed=7, **extra)
        try:
            assert mismatches(reference, generate(eng, prompts, params, groups, stagger=2)) == []
        finally:
            eng.close()
    # the draws are random ones: the requests' outputs are not all alike
    assert len({tuple(t for t, _ in out) for out in reference}) > NUM_BASE // 2


def test_a_request_without_a_seed_gets_the_engines_and_keeps_its_own():
    assert request_params(SamplingParams(temperature=1.0), 7).seed == 7
    assert request_params(SamplingParams(temperature=1.0, seed=3), 7).seed == 3


def test_cpu_linear_computes_a_row_the_same_way_at_any_row_count_and_position():
    """MKL takes one kernel for 1 row, another for 2-3 and another for 4 or more (F.linear below shows it);
    determinism.linear gives it at least MIN_CPU_ROWS rows, and then a row's result does not move."""
    torch.manual_seed(0)
    weight, bias = torch.randn(192, 64), torch.randn(192)
    rows = torch.randn(300, 64)
    ref = linear(rows[:1], weight, bias)[0]
    assert not torch.equal(
        torch.nn.functional.linear(rows[:1], weight)[0], torch.nn.functional.linear(rows[:8], weight)[0]
    )
    rng = random.Random(0)
    for count in [1, 2, 3, 5, MIN_CPU_ROWS - 1, MIN_CPU_ROWS, 17, 64, 299]:
        at = rng.randrange(count)
        batch = torch.cat([rows[1 : at + 1], rows[:1], rows[at + 1 : count]])
        assert torch.equal(linear(batch, weight, bias)[at], ref), count


def test_more_than_two_tensor_parallel_ranks_are_refused():
    with pytest.raises(ValueError, match="at most 2 tensor-parallel ranks"):
        EngineConfig(enable_deterministic_inference=True, tp_size=4)
