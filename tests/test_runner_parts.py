"""The model runner's collaborators on their own (CPU): KV pool sizing, the attention interface's defaults,
and a step result's packing and unpacking. The runner as a whole is covered by test_fidelity, test_llm and
test_parallel."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ringllm.engine.attention.torch_backend import TorchAttention
from ringllm.engine.config import EngineConfig
from ringllm.engine.core.plan import StepPlan
from ringllm.engine.core.slots import PAGE_SIZE
from ringllm.engine.kv_cache import KVPool, kv_pool_slots
from ringllm.engine.sampler import SampleResult
from ringllm.engine.step_result import StepResult, file_prompt_logprobs, pack_sample, prompt_logprob_positions

CPU = torch.device("cpu")


def _never_profiled() -> int:
    raise AssertionError("the forward is profiled only on a GPU")


def test_kv_pool_slots_from_tokens_or_the_cpu_budget():
    per_token = KVPool.bytes_per_token(2, 2, 8, torch.float32)  # 256 bytes
    # kv_cache_tokens, plus slot 0 (never handed out)
    assert kv_pool_slots(EngineConfig(kv_cache_tokens=100), per_token, CPU, _never_profiled) == 101
    assert kv_pool_slots(EngineConfig(cpu_kv_cache_gb=1 / 1024), per_token, CPU, _never_profiled) == 4096
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        kv_pool_slots(EngineConfig(cpu_kv_cache_gb=1e-9), per_token, CPU, _never_profiled)


def test_attention_backends_run_without_cuda_graphs_unless_they_declare_them():
    pool = KVPool(1, 8 * PAGE_SIZE, 1, 4, torch.float32, CPU)
    attn = TorchAttention(pool, 2, 4)
    assert attn.supports_cuda_graphs is False and attn.kv_store_target(0) is None
    with pytest.raises(NotImplementedError):
        attn.make_graph_decoder(1, torch.zeros(8, dtype=torch.int32))


def test_a_packed_step_unpacks_to_its_tokens_logprobs_and_prompt_logprobs():
    sample = SampleResult(
        torch.tensor([5, 7]),
        torch.tensor([-0.5, -1.5]),
        torch.tensor([[5, 1], [7, 2]]),
        torch.tensor([[-0.5, -2.0], [-1.5, -3.0]]),
    )
    # Batch entry 1 asked for prompt logprobs (k = 1) and computes positions 0..3 of a 4-token prompt: the
    # tokens after positions 0, 1, 2 are prompt tokens, so three prompt rows follow the two sampled ones.
    starts, lens, prompt_lens, ks = np.array([3, 0]), np.array([1, 4]), np.array([3, 4]), np.array([-1, 1])
    index, pos = prompt_logprob_positions(starts, lens, prompt_lens, ks)
    assert index.tolist() == [1, 1, 1] and pos.tolist() == [0, 1, 2]
    # float32 holds these logprobs exactly, so they come back equal
    prompt_rows = torch.tensor(
        [[11, -0.125, 11, 12, -0.125, -0.25], [12, -0.75, 9, 12, -0.5, -0.75], [13, -0.5, 13, 4, -0.5, -1.0]]
    )
    host = StepResult(torch.cat([pack_sample(sample, 2), prompt_rows]), top_k=2, num_rows=2).wait()
    assert host.tokens.tolist() == [5, 7] and host.logprobs == [-0.5, -1.5]
    assert host.top == ([[5, 1], [7, 2]], [[-0.5, -2.0], [-1.5, -3.0]])
    plan = StepPlan(
        rows=np.array([0, 1]),
        starts=np.array([3, 0]),
        lens=np.array([1, 4]),
        sample=np.array([True, True]),
    )
    seqs = [
        SimpleNamespace(params=SimpleNamespace(prompt_logprobs=None), num_prompt=3, prompt_logprobs=[]),
        SimpleNamespace(params=SimpleNamespace(prompt_logprobs=1), num_prompt=4, prompt_logprobs=[]),
    ]
    assert host.prompt is not None
    file_prompt_logprobs(seqs, plan, host.prompt)
    assert seqs[1].prompt_logprobs == [(-0.125, [(11, -0.125)]), (-0.75, [(9, -0.5)]), (-0.5, [(13, -0.5)])]
    assert not seqs[0].prompt_logprobs
    file_prompt_logprobs(seqs, plan, host.prompt)  # the same positions again (a recompute): filed once only
    assert len(seqs[1].prompt_logprobs) == 3
