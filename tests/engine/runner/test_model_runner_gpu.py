"""The runner's fast decode path end to end (`pytest -m gpu`): decode_prep and the fused sampler's in-kernel
write-back give the tokens of the general path, for plain and mixed batches."""

import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from ringllm.engine.runner.inputs import StepInputs
from ringllm.engine.runner.result_sink import ResultSink
from tests.engine.gpu_helpers import gpu_prompts

pytestmark = pytest.mark.gpu


PLAIN_KINDS = [dict(temperature=0.0), dict(temperature=1.0, seed=7), dict(temperature=0.8)]


# top-p (the reference sampler) and logprobs rows finish first, so that the later steps take the fused
# sampler's write-back (`land`) beside rows that have needed the torch paths
MIXED_KINDS = PLAIN_KINDS + [
    dict(temperature=1.0, top_p=0.9, seed=3, max_tokens=8),
    dict(temperature=0.0, logprobs=2, max_tokens=8),
    dict(temperature=1.5, seed=11),
]


def _generate_mixed(gpu_ckpt, prompts, kinds):
    """Each prompt with the next of `kinds` (sampling parameters), in one batch."""
    engine = Engine(
        EngineConfig(
            model=str(gpu_ckpt), device="cuda", max_bs=16, context_len=512, dtype="bfloat16", kv_cache_tokens=4096
        )
    )
    out: dict[str, list] = {}
    try:
        for i, p in enumerate(prompts):
            kind = {"max_tokens": 24} | kinds[i % len(kinds)]
            engine.add_request(f"m{i}", p, SamplingParams(ignore_eos=True, **kind))
            out[f"m{i}"] = []
        while engine.has_work:
            for o in engine.step():
                if o.token_id is not None:
                    out[o.rid].append(o.token_id)
        return list(out.values())
    finally:
        engine.close()


@pytest.mark.parametrize("kinds", [PLAIN_KINDS, MIXED_KINDS], ids=["plain", "mixed"])
def test_decode_kernels_give_the_tokens_of_the_torch_path(gpu_ckpt, kinds, monkeypatch):
    """End to end, with CUDA graphs: decode_prep and the fused sampler's in-kernel table reads and token
    write-back give exactly the tokens of the general StepInputs path and the sink's own write-back: greedy,
    seeded and unseeded rows alone (the sampler's all-plain shortcut), and beside top-p and logprobs rows."""
    prompts = gpu_prompts() + gpu_prompts()[:2]
    fast = _generate_mixed(gpu_ckpt, prompts, kinds)
    monkeypatch.setattr(StepInputs, "fits_decode_kernel", lambda self, plan: False)
    monkeypatch.setattr(ResultSink, "kernel_target", property(lambda self: None))  # the sink lands and packs
    slow = _generate_mixed(gpu_ckpt, prompts, kinds)
    assert fast == slow
    assert [len(t) for t in fast] == [kinds[i % len(kinds)].get("max_tokens", 24) for i in range(len(prompts))]
