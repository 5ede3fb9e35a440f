"""A step's result as the engine reads it (engine/step_result.py): packed by the runner's sink
(engine/runner/result_sink.py), unpacked to tokens, logprobs and prompt logprobs, prompt rows filed once."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from ringllm.engine.core.plan import StepPlan
from ringllm.engine.runner.result_sink import pack_prompt_rows, pack_sample
from ringllm.engine.sampler import SampleResult
from ringllm.engine.step_result import StepResult, file_prompt_logprobs, prompt_logprob_positions


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
    # float32 holds these logprobs exactly, so they come back equal; a prompt row starts with its token's rank
    prompt_rows = torch.tensor(
        [[1, -0.125, 11, 12, -0.125, -0.25], [2, -0.75, 9, 12, -0.5, -0.75], [1, -0.5, 13, 4, -0.5, -1.0]]
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
        SimpleNamespace(
            params=SimpleNamespace(prompt_logprobs=None), num_prompt=3, prompt_logprobs=[], prompt_ranks=[]
        ),
        SimpleNamespace(params=SimpleNamespace(prompt_logprobs=1), num_prompt=4, prompt_logprobs=[], prompt_ranks=[]),
    ]
    assert host.prompt is not None
    file_prompt_logprobs(seqs, plan, host.prompt)
    assert seqs[1].prompt_logprobs == [(-0.125, [(11, -0.125)]), (-0.75, [(9, -0.5)]), (-0.5, [(13, -0.5)])]
    assert seqs[1].prompt_ranks == [1, 2, 1]
    assert not seqs[0].prompt_logprobs
    file_prompt_logprobs(seqs, plan, host.prompt)  # the same positions again (a recompute): filed once only
    assert len(seqs[1].prompt_logprobs) == len(seqs[1].prompt_ranks) == 3


def test_a_prompt_row_holds_its_tokens_rank_logprob_and_the_top_k():
    """pack_prompt_rows: the rank counts the tokens likelier than the prompt token (ties share a rank), beyond
    the top k too."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, 1.0], [5.0, 1.0, 1.0, 1.0, 1.0]])
    rows = pack_prompt_rows(lambda h: h, logits, torch.tensor([4, 0]), top_k=1)
    lp = torch.log_softmax(logits, -1)
    assert rows[:, 0].tolist() == [3, 1]  # 3.0 and 2.0 beat token 4 (1.0, tied with token 2)
    assert torch.allclose(rows[:, 1], torch.stack([lp[0, 4], lp[1, 0]]))
    assert rows[:, 2].tolist() == [1, 0] and torch.allclose(rows[:, 3], lp.max(-1).values)
