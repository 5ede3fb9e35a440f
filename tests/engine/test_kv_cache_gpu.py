"""The fp8 KV cache on the GPU (`--kv-cache-dtype fp8`, `pytest -m gpu`): graphs against eager and the torch
backend, the pool's size, teacher-forced logprobs on the Qwen3-0.6B shape, cascade over fp8."""

import pytest
import torch

from ringllm.engine import EngineConfig
from ringllm.engine.engine import Engine
from tests.engine.gpu_helpers import (
    generate,
    greedy_agreement,
    parallel_prompts,
    prefix_shape_greedy,
    teacher_forced,
    teacher_forced_agreement,
)

pytestmark = pytest.mark.gpu


FP8 = torch.float8_e4m3fn


def test_fp8_kv_engine_graphs_match_eager_and_torch_backend(gpu_ckpt):
    """The whole engine with --kv-cache-dtype fp8 on the GPU: CUDA graphs (fused fp8 store, graph decoders over
    fp8) give eager's tokens, and FlashInfer agrees with the torch backend over fp8 (long common prefixes: a
    little looser than the bf16 test's 0.8, since the two backends' bf16 K can round to different fp8 values
    where they differ in the last bit). Both passes run: the second one hits the prefix cache."""
    graphs = generate(gpu_ckpt, kv_cache_dtype="fp8")
    eager = generate(gpu_ckpt, kv_cache_dtype="fp8", enforce_eager=True)
    assert graphs[0] == eager[0]
    ref = generate(gpu_ckpt, kv_cache_dtype="fp8", attention_backend="torch")[0]
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(graphs[0], ref)]
    assert sum(agree) >= 0.6 * sum(len(x) for x in ref), agree


def test_fp8_kv_pool_holds_twice_the_bf16_tokens_on_the_gpu(gpu_ckpt):
    import gc

    slots = {}
    for name in ("auto", "fp8"):
        # The budget is what the device has free: what earlier tests left in torch's cache would shrink the
        # first engine's share only (seen: 2.3x), so both start from an emptied cache.
        gc.collect()
        torch.cuda.empty_cache()
        config = EngineConfig(
            model=str(gpu_ckpt),
            device="cuda",
            max_bs=16,
            context_len=512,
            dtype="bfloat16",
            gpu_memory_utilization=0.2,
            kv_cache_dtype=name,
            enforce_eager=True,
        )
        engine = Engine(config)
        try:
            assert engine.runner.pool.k.dtype == (FP8 if name == "fp8" else torch.bfloat16)
            slots[name] = engine.runner.num_slots
        finally:
            engine.close()
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    # the budget is what is free after the weights and the measured peak: allow for the allocator's slack
    assert 1.8 * slots["auto"] < slots["fp8"] < 2.2 * slots["auto"], slots


def test_fp8_kv_on_qwen3_06b_shape_teacher_forced(qwen3_06b, one_gpu_greedy):
    """Qwen3-0.6B's shape (random weights): with an fp8 cache, FlashInfer (graphs, fused fp8 store) and the
    torch backend over fp8 meet the thresholds the bf16 comparison meets; against the bf16 cache the
    teacher-forced logprobs move by the fp8 rounding, printed, and bounded well below what garbage K/V give."""
    sequences = [p + [tok for tok, _ in r] for p, r in zip(parallel_prompts(), one_gpu_greedy)]
    bf16 = teacher_forced(qwen3_06b, sequences)
    fp8 = teacher_forced(qwen3_06b, sequences, kv_cache_dtype="fp8")
    fp8_torch = teacher_forced(qwen3_06b, sequences, kv_cache_dtype="fp8", attention_backend="torch")
    gap, same_top, n = teacher_forced_agreement(fp8_torch, fp8)
    fp8_gap, fp8_same_top, _ = teacher_forced_agreement(bf16, fp8)
    print(
        f"fp8 KV: flashinfer vs torch gap {gap:.4f}, top-1 {same_top}/{n}; "
        f"fp8 vs bf16 KV gap {fp8_gap:.4f}, top-1 {fp8_same_top}/{n}"
    )
    assert gap < 0.1 and same_top >= 0.5 * n, (gap, same_top)
    assert 0 < fp8_gap < 0.5, (fp8_gap, fp8_same_top)


def test_fp8_kv_cascade_matches_plain_decode_where_rounding_allows(qwen3_06b):
    """Cascade attention (level 0 on the prefill wrapper, level 1 on the decode wrapper) over an fp8 cache
    against plain decode over it: tokens equal until a near-tie (top two within 0.1 nats)."""
    ref, ref_steps, _ = prefix_shape_greedy(qwen3_06b, kv_cache_dtype="fp8", disable_cascade_attention=True)
    got, got_steps, _ = prefix_shape_greedy(qwen3_06b, kv_cache_dtype="fp8")
    assert ref_steps == 0 and got_steps >= 10, (ref_steps, got_steps)
    matched, margins = greedy_agreement(ref, got)
    print(f"fp8 cascade: {got_steps} steps; greedy matched {matched}, margins at divergence {margins}")
    assert all(m < 0.1 for m in margins), margins
    assert matched >= len(ref) + 16, matched
