"""The one way sampled tokens leave the sampler (engine/runner/result_sink.py), on the CPU: `put` lands the
kept rows' tokens in the token table and packs the sample; the kernel path writes `token_buffer` and says so;
`close` appends prompt rows and gives the engine's StepResult. Zero-copy into pinned memory and the copy ring
need CUDA: test_result_sink_gpu.py."""

import numpy as np
import pytest
import torch

from ringllm.engine.parallel import Layout
from ringllm.engine.runner.inputs import StepIndices
from ringllm.engine.runner.result_sink import StepResults
from ringllm.engine.sampler import SampleResult


def _step(keep):
    """Three batch entries in request rows 4, 1, 2 with 5, 3 and 7 known tokens once computed."""
    t = lambda a: torch.tensor(a, dtype=torch.int64)
    flags = np.array(keep, dtype=bool)
    return StepIndices(t([4, 1, 2]), t([4, 2, 6]), None, t([5, 3, 7]), t(np.flatnonzero(flags)), t(flags))


@pytest.fixture
def results():
    return StepResults(torch.full((6, 10), -1, dtype=torch.int32), Layout(), 6)


def test_put_lands_the_kept_rows_and_packs_tokens_and_logprobs(results):
    sink = results.sink(_step([True, False, True]), 1, None)
    assert sink.kernel_target is None  # logprobs: the sink packs them, not a kernel
    sink.put(SampleResult(torch.tensor([7, 8, 9]), torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([[7], [3], [9]]),
                          torch.tensor([[-0.5], [-0.25], [-2.0]])))  # fmt: skip
    host = sink.close().wait()
    assert host.tokens.tolist() == [7, 8, 9] and host.logprobs == [-0.5, -1.0, -2.0]
    assert host.top == ([[7], [3], [9]], [[-0.5], [-0.25], [-2.0]])
    table = results.req_tokens
    assert table[4, 5] == 7 and table[2, 7] == 9 and table[1, 3] == -1  # the dropped row's token is not landed
    assert (table != -1).sum() == 2


def test_a_kernel_writes_token_buffer_and_says_so(results):
    """What the fused sampler does where the sink offers a kernel target: it lands the tokens itself (here by
    hand) and packs them into token_buffer; the sink lands nothing more."""
    ix = _step([True, True, True])
    sink = results.sink(ix, None, None)
    req_tokens, keep_flags = sink.kernel_target
    assert req_tokens is results.req_tokens and keep_flags is ix.keep_flags
    buffer = sink.token_buffer()
    assert buffer.shape == (3, 1) and buffer.dtype == torch.float32 and not results.zero_copy
    buffer[:, 0] = torch.tensor([11.0, 12.0, 13.0])
    sink.put_packed()
    assert sink.close().wait().tokens.tolist() == [11, 12, 13]
    assert (results.req_tokens == -1).all()


def test_prompt_rows_follow_the_sampled_rows(results):
    prompt_rows = torch.tensor([[5.0, -0.25, 5.0, -0.25], [6.0, -0.5, 2.0, -0.125]])
    sink = results.sink(_step([True, True, True]), 1, prompt_rows)
    sink.put(SampleResult(torch.tensor([1, 2, 3]), torch.zeros(3), torch.zeros(3, 1), torch.zeros(3, 1)))
    host = sink.close().wait()
    assert host.tokens.tolist() == [1, 2, 3] and host.prompt is not None
    assert host.prompt.tolist() == prompt_rows.tolist()


def test_a_sink_nothing_was_written_through_refuses_to_close(results):
    with pytest.raises(AssertionError, match="wrote nothing"):
        results.sink(_step([True, True, True]), None, None).close()
