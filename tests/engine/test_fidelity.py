"""Greedy tokens from the engine equal transformers' generate, for each family, in every scheduling mode."""

import random

import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from tests.helpers import hf_greedy, run_engine, tiny_checkpoint

MAX_NEW = 12
MODES = {
    "plain": dict(),
    "no-overlap": dict(disable_overlap_schedule=True),
    "no-radix": dict(disable_radix_cache=True),
    "chunked": dict(max_num_batched_tokens=7),
    "chunked-no-overlap": dict(max_num_batched_tokens=7, disable_overlap_schedule=True),
    "preempt": dict(kv_cache_tokens=64, max_num_batched_tokens=32),
    "preempt-no-overlap": dict(kv_cache_tokens=64, max_num_batched_tokens=32, disable_overlap_schedule=True),
}


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(vocab) for _ in range(20)]
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (3, 17, 1, 30, 9)]
    prompts += [shared + [rng.randrange(vocab) for _ in range(n)] for n in (2, 5, 11)]
    return prompts


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def family(request, tmp_path_factory):
    path = tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), tie=request.param == "qwen2")
    prompts = _prompts(256)
    return path, prompts, hf_greedy(path, prompts, MAX_NEW)


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_matches_transformers(family, mode):
    path, prompts, expected = family
    engine = Engine(EngineConfig(model=str(path), device="cpu", max_bs=8, seed=0, **MODES[mode]))
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    first = run_engine(engine, prompts, params, "a")
    assert first == expected
    # Second pass: the radix cache now holds every prompt; the shared-prefix prompts hit it.
    second = run_engine(engine, prompts, params, "b")
    assert second == expected
    stats = engine.stats()
    if not MODES[mode].get("disable_radix_cache") and "preempt" not in mode:
        assert stats["prefix_cache_hit_tokens"] > sum(len(p) for p in prompts) // 2
    if "preempt" in mode:
        assert stats["preemptions"] > 0
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_slots_used_by_requests"] == 0  # every slot is free or owned by the cache


def _hf_prompt_logprobs(path, prompts, k):
    """For each prompt: (logprob of token p+1 given tokens 0..p, top-k ids) at every p, from transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), dim=-1)
        out.append([(lp[i, p[i + 1]].item(), lp[i].topk(k).indices.tolist()) for i in range(len(p) - 1)])
    return out


@pytest.mark.parametrize("mode", ["plain", "chunked", "preempt-no-overlap"])
def test_prompt_logprobs_match_transformers(family, mode):
    """Every prompt token's logprob given those before it, with the top 3, even when the prompt is cached
    (it is computed again), split into chunks, or recomputed after preemption."""
    path, prompts, expected = family
    reference = _hf_prompt_logprobs(path, prompts, 3)
    engine = Engine(EngineConfig(model=str(path), device="cpu", max_bs=8, seed=0, **MODES[mode]))
    run_engine(engine, prompts, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), "warm")
    preemptions = engine.stats()["preemptions"]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    got, tokens = {}, {f"p{i}": [] for i in range(len(prompts))}
    while engine.has_work:
        for o in engine.step():
            tokens[o.rid].append(o.token_id)
            if o.prompt_logprobs is not None:
                assert o.rid not in got  # once, with the first token
                got[o.rid] = o.prompt_logprobs
    assert [tokens[f"p{i}"] for i in range(len(prompts))] == expected
    for i, ref in enumerate(reference):
        mine = got[f"p{i}"]
        assert len(mine) == len(ref) == len(prompts[i]) - 1
        for (lp, top), (ref_lp, ref_top) in zip(mine, ref):
            assert abs(lp - ref_lp) < 1e-4
            assert [t for t, _ in top] == ref_top
            assert top[0][1] >= lp - 1e-5 and len(top) == 3
    if "preempt" in mode:
        assert engine.stats()["preemptions"] > preemptions  # some prompts were computed twice
