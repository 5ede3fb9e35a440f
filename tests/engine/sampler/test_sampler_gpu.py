"""The sampler's kernel path on CUDA (`pytest -m gpu`): every row field is honoured when the fused Gumbel-max
kernel runs. A field the kernel reads itself changes its draws as declared; a field that takes a row off the
fused pass gives, through the real CUDA decision, what the field asks for (the scenarios of test_rows.py)."""

import numpy as np
import pytest
import torch

from ringllm.engine.sampler import ROW_FIELDS
from ringllm.engine.sampler.rows import KERNEL, RUNNER
from ringllm.engine.sampling_params import SamplingParams
from tests.engine.sampler.test_rows import CHANGED, LOGITS, ROWS
from tests.helpers import make_sampler, sample_through_sink

pytestmark = pytest.mark.gpu


DEVICE = "cuda"


def _sampler(params: list[SamplingParams], prompt_lens=None):
    """A CUDA sampler (fused kernel on) over ROWS rows of `params`, token 0 in each row's output history."""
    s = make_sampler(ROWS, len(LOGITS), eos=[0], device=DEVICE)
    assert s.fused or DEVICE == "cpu"
    s.table.set(list(range(ROWS)), params, prompt_lens or [1] * ROWS)
    s.req_tokens[:, :2] = torch.tensor([5, 0], device=DEVICE)
    return s


def _cuda(params: list[SamplingParams], prompt_lens=None):
    """One step of ROWS rows of `params` on a fresh CUDA sampler: each row's output index 2 - prompt_len."""
    return sample_through_sink(_sampler(params, prompt_lens), LOGITS.repeat(ROWS, 1), range(ROWS), [2] * ROWS)


def _seeded(**fields) -> list[SamplingParams]:
    return [SamplingParams(**{"temperature": 1.0, "seed": i, **fields}) for i in range(ROWS)]


LOGPROBS = torch.log_softmax(LOGITS, -1)
# What each field asks for, as a check of a HostSample of the scenario in CHANGED.
ASKED = {
    "top_k": lambda out: (out.tokens == 0).all(),
    "top_p": lambda out: (out.tokens == 0).all(),
    "min_p": lambda out: (out.tokens == 0).all(),
    "repetition_penalty": lambda out: (out.tokens == 1).all(),
    "presence_penalty": lambda out: (out.tokens == 1).all(),
    "frequency_penalty": lambda out: (out.tokens == 1).all(),
    "has_bias": lambda out: (out.tokens == 4).all(),
    "min_tokens": lambda out: 0 not in out.tokens.tolist(),  # EOS (0) while the row is short
    "has_allowed": lambda out: (out.tokens == 4).all(),
    "has_bad_words": lambda out: 0 not in out.tokens.tolist(),  # 0 after the output's 0, read on the device
    "logprobs": lambda out: (
        out.logprobs is not None
        and np.allclose(out.logprobs, LOGPROBS[out.tokens].numpy(), atol=1e-4)
        and all(ids == [0, 1] for ids in out.top[0])
    ),
}


@pytest.mark.parametrize("name", sorted(f.name for f in ROW_FIELDS if f.stage not in (KERNEL, RUNNER)))
def test_the_cuda_sampler_honours_every_field_that_leaves_the_fused_pass(name):
    assert set(ASKED) == {f.name for f in ROW_FIELDS if f.stage not in (KERNEL, RUNNER)}
    asked = ASKED[name]
    assert not asked(_cuda(_seeded())), "the neutral scenario already looks like the field's effect"
    assert asked(_cuda(_seeded(**CHANGED[name]))), name


def test_the_fused_kernel_reads_every_kernel_field():
    """temperature 0 is the argmax; a seed fixes a row's draw whatever its batch index; prompt_len moves a
    seeded row's output index and so its draw; unseeded rows draw anew each step."""
    assert {f.name for f in ROW_FIELDS if f.stage == KERNEL} == {"temperature", "seed", "has_seed", "prompt_len"}
    greedy = _cuda([SamplingParams(temperature=0.0)] * ROWS).tokens
    hot = _cuda(_seeded()).tokens
    assert (greedy == 0).all() and len(set(hot.tolist())) > 2
    same_seed = _cuda([SamplingParams(temperature=1.0, seed=7)] * ROWS).tokens
    assert len(set(same_seed.tolist())) == 1  # seeded: the same draw in every batch position
    assert (_cuda(_seeded()).tokens == hot).all()  # and the same in another step
    moved = _cuda(_seeded(), prompt_lens=[0] * ROWS).tokens  # output index 2, not 1
    assert (moved != hot).any()
    s = _sampler([SamplingParams(temperature=1.0)] * ROWS)
    unseeded = [sample_through_sink(s, LOGITS.repeat(ROWS, 1), range(ROWS), [2] * ROWS).tokens for _ in range(2)]
    assert (unseeded[0] != unseeded[1]).any() and len(set(unseeded[0].tolist())) > 2


def test_bad_words_and_allowed_tokens_on_a_cuda_decode_steps_int32_indices():
    """A CUDA decode step hands the sampler int32 rows and seq_lens: a two-token bad word still reads the row's
    history on the device, beside a row with allowed_token_ids and a plain greedy row."""
    params = [
        SamplingParams(temperature=0.0, bad_words_token_ids=[[0, 0]]),  # output [0]: 0 is banned now
        SamplingParams(temperature=0.0, allowed_token_ids=[3, 5]),
        SamplingParams(temperature=0.0),
    ] * (ROWS // 3) + [SamplingParams(temperature=0.0)] * (ROWS % 3)
    s = _sampler(params)
    out = sample_through_sink(s, LOGITS.repeat(ROWS, 1), range(ROWS), [2] * ROWS, index_dtype=np.int32)
    assert out.tokens.tolist()[:3] == [1, 3, 0]
