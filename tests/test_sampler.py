"""Sampler distributions on fixed logits, seeds, penalties."""

import numpy as np
import pytest
import torch

from ringllm.engine.sampler import Sampler
from ringllm.engine.sampling_params import SamplingParams

N = 20_000
LOGITS = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))


def _draw(params: SamplingParams, n: int = N, seed: int = 0):
    s = Sampler(n, len(LOGITS), torch.device("cpu"), seed)
    rows = list(range(n))
    s.set_rows(rows, [params] * n, [1] * n)
    rows_np = np.arange(n)
    out = s(LOGITS.repeat(n, 1), rows_np, torch.from_numpy(rows_np), None, torch.full((n,), 1))
    return out.tokens


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


def test_penalties():
    s = Sampler(2, 6, torch.device("cpu"), 0)
    s.set_rows(
        [0, 1],
        [
            SamplingParams(temperature=0.0, frequency_penalty=2.0),
            SamplingParams(temperature=0.0, repetition_penalty=2.0),
        ],
        [1, 1],
    )
    logits = torch.tensor([[3.0, 2.9, 0, 0, 0, 0], [3.0, 2.0, 0, 0, 0, 0]])
    history = torch.tensor([[5, 0, 0, 0], [0, 1, 1, 1]])  # row 0: prompt [5], output [0, 0, 0]
    out = s(logits, np.array([0, 1]), torch.tensor([0, 1]), history, torch.tensor([4, 4]))
    assert out.tokens.tolist() == [1, 0]  # row 0: 3 - 2*3 < 2.9; row 1: 3/2 = 1.5 vs 2/2 = 1.0


def test_logprobs():
    s = Sampler(1, 6, torch.device("cpu"), 0)
    s.set_rows([0], [SamplingParams(temperature=0.0, logprobs=2)], [1])
    out = s(LOGITS[None], np.array([0]), torch.tensor([0]), None, torch.tensor([1]))
    assert out.logprobs[0].item() == pytest.approx(np.log(0.4), abs=1e-5)
    assert out.top_ids[0].tolist() == [0, 1]


def test_nan_and_inf_logits_do_not_pick_token_zero():
    """A penalised row whose logits hold NaN or +inf still samples a real token (before the guard, NaN made
    argmax return token 0 and inf - inf made the softmax NaN)."""
    s = Sampler(2, 6, torch.device("cpu"), 0)
    s.set_rows(
        [0, 1],
        [
            SamplingParams(temperature=0.0, repetition_penalty=1.2),
            SamplingParams(temperature=1.0, repetition_penalty=1.2),
        ],
        [1, 1],
    )
    logits = torch.tensor([[float("nan"), 1.0, 2.0, 0, 0, 0], [float("nan"), float("inf"), 0, 0, 0, 0]])
    history = torch.tensor([[5], [5]])
    out = s(logits, np.array([0, 1]), torch.tensor([0, 1]), history, torch.tensor([1, 1]))
    assert out.tokens.tolist() == [2, 1]


def test_a_sampler_of_plain_rows_skips_the_stage_checks_until_a_row_needs_them():
    """`all_plain` (every row set so far needs only the fused pass) turns off the per-step host checks; a row
    with a penalty, filter or logprobs turns them back on, and a row keeps its last request's values."""
    s = Sampler(4, 6, torch.device("cpu"), 0)
    assert s.all_plain
    s.set_rows([0, 2], [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3)], [1, 1])
    assert s.all_plain and not s.needs_history(np.array([0, 2]))
    for special in (dict(presence_penalty=0.5), dict(top_p=0.9), dict(logprobs=1), dict(logit_bias={1: 2.0})):
        s.set_rows([1], [SamplingParams(**special)], [1])
        assert not s.all_plain, special
        s.set_rows([1], [SamplingParams()], [1])  # the row reused by a plain request
        assert s.all_plain, special
    s.set_rows([3], [SamplingParams(repetition_penalty=1.3)], [1])
    assert not s.all_plain and s.needs_history(np.array([0, 3])) and not s.needs_history(np.array([0, 2]))
