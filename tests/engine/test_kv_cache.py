"""FP8 (e4m3) KV cache, `--kv-cache-dtype fp8`, on the CPU through the torch backend: the setting, the pool's
size, the clamped store, attention over the upcast cache, and the engine's logits against a full-precision
cache in every scheduling mode (prefix cache, chunked prefill, preemption). The fused Triton store and
FlashInfer over fp8 are in test_kv_cache_gpu.py and attention/test_flashinfer_gpu.py."""

import random

import numpy as np
import pytest
import torch

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.attention import AttentionMetadata
from ringllm.engine.attention.torch_backend import TorchAttention
from ringllm.engine.engine import Engine
from ringllm.engine.kv_cache import FP8_KV_DTYPE, KVPool, kv_cache_dtype
from tests.helpers import run_engine, tiny_checkpoint

FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3"])
def test_fp8_names_select_float8_e4m3(name):
    assert EngineConfig(kv_cache_dtype=name).kv_cache_dtype == name
    assert kv_cache_dtype(name, torch.bfloat16) is FP8
    assert kv_cache_dtype("auto", torch.bfloat16) is torch.bfloat16


@pytest.mark.parametrize("bad", ["fp8_e5m2", "int8", "bfloat16", ""])
def test_unknown_kv_cache_dtype_is_refused_naming_the_choices(bad):
    with pytest.raises(ValueError, match=r"kv_cache_dtype .* is not implemented: use one of auto, fp8, fp8_e4m3"):
        EngineConfig(kv_cache_dtype=bad)


def test_fp8_pool_takes_half_the_bytes_of_bf16():
    args = (3, 4, 64)  # layers, kv heads, head dim
    assert KVPool.bytes_per_token(*args, FP8) * 2 == KVPool.bytes_per_token(*args, torch.bfloat16)
    assert KVPool.bytes_per_token(*args, FP8) * 4 == KVPool.bytes_per_token(*args, torch.float32)
    bf16 = KVPool(3, 10, 4, 64, torch.bfloat16, torch.device("cpu"))
    fp8 = KVPool(3, 10, 4, 64, torch.bfloat16, torch.device("cpu"), FP8)
    assert fp8.k.dtype == fp8.v.dtype == FP8 and fp8.dtype == torch.bfloat16
    assert 2 * (fp8.k.nbytes + fp8.v.nbytes) == bf16.k.nbytes + bf16.v.nbytes


def test_store_rounds_to_fp8_and_clamps_out_of_range_values():
    pool = KVPool(1, 8, 1, 4, torch.bfloat16, torch.device("cpu"), FP8)
    k = torch.tensor([[[1.0, -3.3, 1000.0, float("inf")]], [[0.0123, 447.0, -1e4, -float("inf")]]])
    v = -k
    pool.store(0, torch.tensor([2, 5]), k.bfloat16(), v.bfloat16())
    got = pool.k[0][[2, 5]].float()
    assert not got.isnan().any() and not pool.v[0].float().isnan().any()
    assert got.abs().max() == 448.0
    assert got[0, 0].tolist() == [1.0, -3.25, 448.0, 448.0]  # -3.3 rounds to fp8's nearest, -3.25
    assert got[1, 0, 2] == -448.0 and got[1, 0, 3] == -448.0
    assert torch.equal(pool.v[0][[2, 5]].float(), -got)
    assert pool.k[0][[0, 1, 3, 4, 6, 7]].float().abs().sum() == 0  # other slots untouched


def test_torch_attention_over_fp8_cache_is_attention_over_the_rounded_values():
    """The fp8 pool gives exactly what a full-precision pool holding the fp8-rounded K/V gives (so the upcast
    is the only difference), and stays near attention over the unrounded K/V."""
    torch.manual_seed(0)
    cpu, H, Hkv, D, slots = torch.device("cpu"), 4, 2, 16, 64
    new_lens, kv_lens = [1, 5, 3], [9, 5, 20]
    qo, kvp = np.concatenate([[0], np.cumsum(new_lens)]), np.concatenate([[0], np.cumsum(kv_lens)])
    idx = np.random.default_rng(0).permutation(np.arange(1, slots))[: kvp[-1]].astype(np.int32)
    out_slots = np.concatenate([idx[kvp[i + 1] - n : kvp[i + 1]] for i, n in enumerate(new_lens)])
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int64))
    meta = AttentionMetadata(qo, kvp, np.asarray(kv_lens), False, t(qo), t(kvp), t(idx), t(out_slots))
    cached_k, cached_v = torch.randn(slots, Hkv, D) * 2, torch.randn(slots, Hkv, D) * 2
    T = sum(new_lens)
    q, k, v = torch.randn(T, H, D), torch.randn(T, Hkv, D) * 2, torch.randn(T, Hkv, D) * 2
    rounded = lambda x: x.to(FP8).float()

    def attend(kv_dtype, ck, cv, k, v):
        pool = KVPool(1, slots, Hkv, D, torch.float32, cpu, kv_dtype)
        pool.k[0].copy_(ck.to(pool.k.dtype)), pool.v[0].copy_(cv.to(pool.v.dtype))
        attn = TorchAttention(pool, H, D)
        attn.begin(meta)
        return attn.forward(0, q, k, v)

    fp8 = attend(FP8, cached_k, cached_v, k, v)
    ref_rounded = attend(None, rounded(cached_k), rounded(cached_v), rounded(k), rounded(v))
    exact = attend(None, cached_k, cached_v, k, v)
    assert torch.allclose(fp8, ref_rounded, atol=1e-6, rtol=1e-5)
    err = ((fp8 - exact).norm() / exact.norm()).item()
    assert 1e-4 < err < 0.05, err  # fp8's 3 mantissa bits: visible, small


MODES = {
    "plain": dict(),
    "no-radix": dict(disable_radix_cache=True),
    "chunked": dict(max_num_batched_tokens=7),
    "preempt": dict(kv_cache_tokens=64, max_num_batched_tokens=32),
    "preempt-no-overlap": dict(kv_cache_tokens=64, max_num_batched_tokens=32, disable_overlap_schedule=True),
}
MAX_NEW = 12


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    shared = [rng.randrange(256) for _ in range(20)]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (3, 17, 1, 30, 9)]
    return prompts + [shared + [rng.randrange(256) for _ in range(n)] for n in (2, 5, 11)]


def _engine(path, **kw) -> Engine:
    return Engine(EngineConfig(model=str(path), device="cpu", max_bs=8, seed=0, **kw))


def _teacher_forced(path, sequences, **kw) -> list[float]:
    """Each position's logprob of the sequence's next token (prompt logprobs: teacher forcing)."""
    engine = _engine(path, **kw)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
        for i, seq in enumerate(sequences):
            engine.add_request(f"t{i}", seq, params)
        got = {}
        while engine.has_work:
            for o in engine.step():
                if o.prompt_logprobs is not None:
                    got[o.rid] = o.prompt_logprobs
    finally:
        engine.close()
    return [lp for i in range(len(sequences)) for lp, _ in got[f"t{i}"]]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def family(request, tmp_path_factory):
    """A tiny checkpoint, fp8 greedy tokens in the plain mode, and teacher-forced logprobs over them with
    the full-precision (float32) cache."""
    path = tiny_checkpoint(request.param, tmp_path_factory.mktemp(f"fp8-{request.param}"))
    engine = _engine(path, kv_cache_dtype="fp8")
    try:
        assert engine.runner.pool.k.dtype == FP8_KV_DTYPE
        greedy = run_engine(engine, _prompts(), SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True))
    finally:
        engine.close()
    sequences = [p + g for p, g in zip(_prompts(), greedy)]
    return path, greedy, sequences, _teacher_forced(path, sequences)


@pytest.mark.parametrize("mode", list(MODES))
def test_fp8_kv_greedy_is_the_same_in_every_scheduling_mode(family, mode):
    """Prefix-cache hits (second pass), chunked prefill and preemption reuse or recompute the same fp8 K/V,
    so the tokens equal the plain mode's exactly."""
    path, greedy, _, _ = family
    engine = _engine(path, kv_cache_dtype="fp8", **MODES[mode])
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    try:
        assert run_engine(engine, _prompts(), params, "a") == greedy
        assert run_engine(engine, _prompts(), params, "b") == greedy
        stats = engine.stats()
    finally:
        engine.close()
    if "preempt" in mode:
        assert stats["preemptions"] > 0
    elif not MODES[mode].get("disable_radix_cache"):
        assert stats["prefix_cache_hit_tokens"] > sum(len(p) for p in _prompts()) // 2


@pytest.mark.parametrize("mode", ["plain", "chunked", "preempt"])
def test_fp8_kv_logprobs_stay_near_the_full_precision_cache(family, mode):
    """Teacher-forced on the same sequences, fp8 K/V move each next-token logprob by a few percent of how much
    those logprobs vary (measured ~0.04 on both tiny models); greedy paths part early on random weights'
    near-flat logits, so tokens are not compared across dtypes."""
    path, _, sequences, ref = family
    got = _teacher_forced(path, sequences, kv_cache_dtype="fp8", **MODES[mode])
    g, r = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    assert len(g) == len(r) == sum(len(s) - 1 for s in sequences)
    gap = ((g - r).norm() / (r - r.mean()).norm()).item()
    assert 1e-4 < gap < 0.1, gap  # fp8 is in use (not zero) and close


def test_fp8_pool_holds_four_times_the_float32_tokens_on_one_budget(tmp_path):
    path = tiny_checkpoint("qwen3", tmp_path / "ck")
    slots = {}
    for name in ("auto", "fp8"):
        engine = _engine(path, kv_cache_dtype=name, cpu_kv_cache_gb=0.001)
        try:
            slots[name] = engine.runner.num_slots
        finally:
            engine.close()
    assert abs(slots["fp8"] - 4 * slots["auto"]) <= 4, slots
