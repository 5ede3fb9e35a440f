"""The sampler's math on the CPU (engine/sampler/sampler.py), through the ResultSink as the runner calls it:
distributions on fixed logits, seeds, penalties, logprobs, min_tokens."""

import numpy as np
import pytest
import torch

from ringllm.engine.sampling_params import SamplingParams
from tests.helpers import make_sampler, sample_through_sink

N = 20_000
LOGITS = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))


def _draw(params: SamplingParams, n: int = N, seed: int = 0) -> torch.Tensor:
    s = make_sampler(n, len(LOGITS), seed)
    s.table.set(list(range(n)), [params] * n, [1] * n)
    return torch.from_numpy(sample_through_sink(s, LOGITS.repeat(n, 1), range(n), [1] * n).tokens)


def _freq(tokens):
    return torch.bincount(tokens, minlength=len(LOGITS)).float() / len(tokens)


def _expect(keep):
    p = LOGITS.exp() * torch.tensor(keep, dtype=torch.float32)
    return p / p.sum()


@pytest.mark.parametrize(
    "params,keep",
    [
        (SamplingParams(temperature=1.0), [1, 1, 1, 1, 1, 1]),
        (SamplingParams(temperature=1.0, top_k=2), [1, 1, 0, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.7), [1, 1, 1, 0, 0, 0]),  # 0.4 + 0.25 < 0.7 needs the third
        (SamplingParams(temperature=1.0, min_p=0.3), [1, 1, 1, 0, 0, 0]),  # floor 0.12
        (SamplingParams(temperature=1.0, top_k=3, top_p=0.6), [1, 1, 0, 0, 0, 0]),  # top-p after top-k renormalises
    ],
)
def test_distribution(params, keep):
    freq = _freq(_draw(params))
    expected = _expect(keep)
    assert torch.all((freq == 0) == (expected == 0))
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_temperature_sharpens():
    cold = _freq(_draw(SamplingParams(temperature=0.5)))
    expected = torch.softmax(LOGITS / 0.5, -1)
    assert torch.allclose(cold, expected, atol=0.015)


def test_greedy_is_argmax():
    assert (_draw(SamplingParams(temperature=0.0), n=10) == 0).all()


def test_seed_reproducible_and_independent_of_batch():
    a = _draw(SamplingParams(temperature=1.0, seed=7), n=8, seed=1)
    b = _draw(SamplingParams(temperature=1.0, seed=7), n=3, seed=2)
    assert a.unique().numel() == 1  # same seed, same output index: same draw
    assert a[0] == b[0]
    many = torch.stack([_draw(SamplingParams(temperature=1.0, seed=s), n=1)[0] for s in range(400)])
    assert torch.allclose(_freq(many), _expect([1] * 6), atol=0.08)  # seeds still sample the distribution


def test_penalties_read_each_rows_history_from_the_token_table():
    s = make_sampler(2, 6)
    s.table.set(
        [0, 1],
        [
            SamplingParams(temperature=0.0, frequency_penalty=2.0),
            SamplingParams(temperature=0.0, repetition_penalty=2.0),
        ],
        [1, 1],
    )
    s.req_tokens[0, :4] = torch.tensor([5, 0, 0, 0])  # row 0: prompt [5], output [0, 0, 0]
    s.req_tokens[1, :4] = torch.tensor([0, 1, 1, 1])
    logits = torch.tensor([[3.0, 2.9, 0, 0, 0, 0], [3.0, 2.0, 0, 0, 0, 0]])
    out = sample_through_sink(s, logits, [0, 1], [4, 4])
    assert out.tokens.tolist() == [1, 0]  # row 0: 3 - 2*3 < 2.9; row 1: 3/2 = 1.5 vs 2/2 = 1.0
    assert s.req_tokens[:, 4].tolist() == [1, 0]  # landed where the next step reads its input


def test_logprobs():
    s = make_sampler(1, 6)
    s.table.set([0], [SamplingParams(temperature=0.0, logprobs=2)], [1])
    out = sample_through_sink(s, LOGITS[None], [0], [1])
    assert out.logprobs is not None and out.logprobs[0] == pytest.approx(np.log(0.4), abs=1e-5)
    assert out.top is not None and out.top[0][0] == [0, 1]


def test_nan_and_inf_logits_do_not_pick_token_zero():
    """A penalised row whose logits hold NaN or +inf still samples a real token (before the guard, NaN made
    argmax return token 0 and inf - inf made the softmax NaN)."""
    s = make_sampler(2, 6)
    s.table.set(
        [0, 1],
        [
            SamplingParams(temperature=0.0, repetition_penalty=1.2),
            SamplingParams(temperature=1.0, repetition_penalty=1.2),
        ],
        [1, 1],
    )
    s.req_tokens[:, 0] = 5
    logits = torch.tensor([[float("nan"), 1.0, 2.0, 0, 0, 0], [float("nan"), float("inf"), 0, 0, 0, 0]])
    assert sample_through_sink(s, logits, [0, 1], [1, 1]).tokens.tolist() == [2, 1]


def test_min_tokens_bans_stop_tokens_until_that_many_outputs_are_out():
    """EOS (here 0) and the row's stop_token_ids (3) cannot be sampled while fewer than min_tokens outputs are
    out (the token sampled now is output seq_len - prompt_len); at min_tokens they are back. ignore_eos leaves
    EOS alone (it ends nothing then) but still bans stop_token_ids; rows without min_tokens are untouched."""
    s = make_sampler(4, 6, eos=[0])
    s.table.set(
        [0, 1, 2, 3],
        [
            SamplingParams(temperature=0.0, min_tokens=3),
            SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3]),
            SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[3], ignore_eos=True),
            SamplingParams(temperature=0.0),
        ],
        [2, 2, 2, 2],
    )
    eos_first = torch.tensor([5.0, 4.0, 0, 0, 0, 0])
    stop_first = torch.tensor([0, 1.0, 0, 5.0, 0, 0])

    def tokens(logits, outputs_so_far):
        batch = torch.stack([logits] * 4)
        return sample_through_sink(s, batch, [0, 1, 2, 3], [2 + outputs_so_far] * 4).tokens.tolist()

    for out in (0, 1, 2):
        assert tokens(eos_first, out) == [1, 1, 0, 0], out
        assert tokens(stop_first, out) == [3, 1, 1, 3], out
    assert tokens(eos_first, 3) == [0, 0, 0, 0]
    assert tokens(stop_first, 3) == [3, 3, 3, 3]


def test_min_tokens_holds_when_the_batch_samples_by_the_reference_path_too():
    """A min_tokens row sampled at temperature 1 with a seed, beside a top-k row: never EOS while short."""
    s = make_sampler(64, 6, eos=[0])
    s.table.set(list(range(64)), [SamplingParams(temperature=1.0, seed=i, min_tokens=2) for i in range(64)], [1] * 64)
    short = sample_through_sink(s, LOGITS.repeat(64, 1), range(64), [2] * 64).tokens
    assert 0 not in short.tolist() and len(set(short.tolist())) > 2
    done = sample_through_sink(s, LOGITS.repeat(64, 1), range(64), [3] * 64).tokens
    assert 0 in done.tolist()


def test_allowed_token_ids_ban_every_other_token_greedy_or_sampled():
    """Rows with allowed_token_ids sample only those (the top token, 0, is not among them); a row without
    keeps the whole vocabulary."""
    s = make_sampler(64, 6)
    allowed = [SamplingParams(temperature=1.0, seed=i, allowed_token_ids=[2, 4]) for i in range(62)]
    plain = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, allowed_token_ids=[5, 3])]
    s.table.set(list(range(64)), allowed + plain, [1] * 64)
    out = sample_through_sink(s, LOGITS.repeat(64, 1), range(64), [1] * 64).tokens.tolist()
    assert set(out[:62]) == {2, 4} and out[62:] == [0, 3], out
    freq = np.bincount(out[:62], minlength=6)
    assert freq[2] > freq[4]  # the allowed tokens keep their relative odds (0.15 against 0.06)


def test_bad_words_ban_a_words_last_token_after_the_rest_of_it_in_the_output():
    """A one-token word is banned outright. A longer word's last token is banned only where the output so far
    ends with its other tokens: read from the request-token table, and only from the output (the same tokens in
    the prompt do not count), as vLLM does."""
    s = make_sampler(4, 6)
    greedy = dict(temperature=0.0)
    s.table.set(
        [0, 1, 2, 3],
        [
            SamplingParams(**greedy, bad_words_token_ids=[[0]]),
            SamplingParams(**greedy, bad_words_token_ids=[[3, 4, 0]]),  # 0 after output ... 3, 4
            SamplingParams(**greedy, bad_words_token_ids=[[5, 0], [1]]),  # 0 after 5: 5 is in the prompt only
            SamplingParams(**greedy),
        ],
        [1, 1, 2, 1],
    )
    # prompts [2], [2], [1, 5] and [2]; outputs [2, 2], [3, 4], nothing yet and [3, 4]
    s.req_tokens[:, :3] = torch.tensor([[2, 2, 2], [2, 3, 4], [1, 5, 0], [2, 3, 4]], dtype=torch.int32)
    out = sample_through_sink(s, LOGITS.repeat(4, 1), range(4), [3, 3, 2, 3]).tokens.tolist()
    assert out == [1, 1, 0, 0]
    # row 1 once its output no longer ends with 3, 4: token 0 is free again
    s.req_tokens[1, :4] = torch.tensor([2, 3, 4, 2], dtype=torch.int32)
    assert sample_through_sink(s, LOGITS.repeat(4, 1), range(4), [4, 4, 3, 4]).tokens.tolist()[1] == 0
    # row 2 with 5 as its first output: 0 is banned after it, and 1 always (int32 indices, as a CUDA decode step's)
    s.req_tokens[2, :3] = torch.tensor([1, 5, 5], dtype=torch.int32)
    out = sample_through_sink(s, LOGITS.repeat(4, 1), range(4), [4, 4, 3, 4], index_dtype=np.int32)
    assert out.tokens.tolist()[2] == 2
