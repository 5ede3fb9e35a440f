"""The start-up warm-up on a GPU (engine/runner/warmup.py): once it has run, a workload of the kinds it covers
(prefill chunks of many sizes, decode batches shrinking through every CUDA-graph bucket, plain and filtered
sampling, logprobs) compiles no Triton kernel: the first run in a process is not cold."""

import random

import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine
from ringllm.engine.runner.warmup import can_watch_compiles, triton_compiles

pytestmark = pytest.mark.gpu


def test_after_the_warmup_a_workload_compiles_no_triton_kernel(qwen3_06b):
    assert can_watch_compiles()  # else the count below would see nothing
    engine = Engine(EngineConfig(model=str(qwen3_06b), max_bs=64, context_len=2048, max_num_batched_tokens=4096))
    try:
        assert engine.warmup is not None and engine.stats()["generated_tokens"] == 0
        rng = random.Random(5)
        for i in range(96):
            extra = [dict(), dict(top_k=40, top_p=0.9), dict(logprobs=2), dict(seed=i)][i % 4]
            params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(4, 90), **extra)
            engine.add_request(f"r{i}", [rng.randint(0, 10000) for _ in range(rng.randint(20, 700))], params)
        with triton_compiles() as compiled:
            while engine.has_work:
                engine.step()
        assert compiled == []
    finally:
        engine.close()
