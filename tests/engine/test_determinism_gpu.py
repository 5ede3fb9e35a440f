"""Deterministic inference on one GPU (`pytest -m gpu`), FlashInfer with CUDA graphs: the CPU test's workload
(tests/engine/determinism_cases.py) gives the same tokens and logprobs, bit for bit, alone and mixed into
batches of other sizes and orders, chunked, with and without cache hits, preempted; seeded temperature-1
requests (the fused Gumbel kernel) reproduce across engines and batch compositions. Every scenario on the tiny
bf16 model; the main ones on a random checkpoint of Qwen3-0.6B's shape. Without the mode the comparison fails."""

import pytest
import torch

from ringllm.engine import SamplingParams
from ringllm.engine.attention.flashinfer_invariant import BatchInvariantFlashInfer
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

pytestmark = pytest.mark.gpu
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)


def _cuda_engine(path, **kw):
    eng = engine(path, device="cuda", attention_backend="flashinfer", **kw)
    assert isinstance(eng.runner.attn, BatchInvariantFlashInfer)
    assert eng.runner.graphs is not None  # decode steps replay CUDA graphs
    return eng


def _greedy_reference(path, vocab):
    """The 64 prompts and each one's output run alone and cold (no radix cache)."""
    eng = _cuda_engine(path, disable_radix_cache=True)
    try:
        base = base_prompts(vocab)
        first = alone(eng, base, [GREEDY] * NUM_BASE)
        more = continuations(base, first, vocab)
        return base + more, first + alone(eng, more, [GREEDY] * len(more))
    finally:
        eng.close()


def _sampled(seeded: bool) -> list[SamplingParams]:
    """Temperature 1: the plain rows through the fused Gumbel kernel, the top-k ones through the reference
    sampler; each with a seed of its own, or none (the engine's --seed then)."""
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


def _sampled_runs(path, prompts, params, batchings) -> tuple[list, list]:
    """The requests alone on one engine, then on a fresh engine per (groups, engine settings) of `batchings`."""
    eng = _cuda_engine(path, disable_radix_cache=True, seed=7)
    try:
        reference = alone(eng, prompts, params)
    finally:
        eng.close()
    runs = []
    for groups, extra in batchings:
        eng = _cuda_engine(path, seed=7, **extra)
        try:
            runs.append(generate(eng, prompts, params, groups, stagger=2))
        finally:
            eng.close()
    return reference, runs


@pytest.fixture(scope="module")
def tiny(gpu_ckpt):
    return gpu_ckpt, *_greedy_reference(gpu_ckpt, 512)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_greedy_outputs_do_not_depend_on_the_batch_the_chunking_or_the_cache(tiny, scenario):
    path, prompts, reference = tiny
    runs, stats = run_scenario(
        path, scenario, prompts, [GREEDY] * len(prompts), device="cuda", attention_backend="flashinfer"
    )
    for got in runs:
        assert mismatches(reference, got) == []
    if scenario == "warm-cache":
        assert stats["prefix_cache_hit_tokens"] >= sum(len(p) - 1 for p in prompts)
    if scenario == "preempted":
        assert stats["preemptions"] > 0


def test_without_the_mode_the_same_comparison_fails(qwen3_06b):
    """The control: the comparison above does see the difference batching makes by default. On the tiny model
    (2 layers, narrow GEMMs) the default kernels happened to be batch-invariant on an H100 too, so the control
    runs on the real shape, where a 1-row and a 64-row step take different GEMM kernels."""
    prompts = base_prompts(512)
    params = [GREEDY] * NUM_BASE
    eng = engine(qwen3_06b, device="cuda", disable_radix_cache=True, enable_deterministic_inference=False)
    try:
        solo = alone(eng, prompts, params)
        together = generate(eng, prompts, params, [list(range(NUM_BASE))])
    finally:
        eng.close()
    assert len(mismatches(solo, together)) > 0


@pytest.mark.parametrize("seeded", [True, False], ids=["own-seed", "engine-seed"])
def test_sampled_requests_reproduce_across_engines_and_batches(gpu_ckpt, seeded):
    batchings = [([list(range(NUM_BASE))], dict(max_num_batched_tokens=24)), (random_groups(48, 4), {})]
    reference, runs = _sampled_runs(gpu_ckpt, base_prompts(512), _sampled(seeded), batchings)
    for got in runs:
        assert mismatches(reference, got) == []
    assert len({tuple(t for t, _ in out) for out in reference}) > NUM_BASE // 2


def test_qwen3_shape_greedy_and_sampled(qwen3_06b):
    """Qwen3-0.6B's shape: its GEMM tiles, and a 151,936-id vocabulary that the fused sampler scans in chunks
    whose size follows the batch (alone: 2,048 ids; 32 rows or more: 8,192)."""
    prompts, reference = _greedy_reference(qwen3_06b, 150_000)
    for scenario in ("all-at-once-chunked", "warm-cache"):
        runs, _ = run_scenario(
            qwen3_06b, scenario, prompts, [GREEDY] * len(prompts), device="cuda", attention_backend="flashinfer"
        )
        for got in runs:
            assert mismatches(reference, got) == [], scenario
    reference, runs = _sampled_runs(
        qwen3_06b, base_prompts(150_000), _sampled(True), [([list(range(NUM_BASE))], dict(max_bs=64))]
    )
    assert mismatches(reference, runs[0]) == []
    torch.cuda.empty_cache()
