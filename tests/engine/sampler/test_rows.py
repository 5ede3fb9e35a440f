"""The row table (engine/sampler/rows.py): every row field's neutral value is the one at which the fused
Gumbel-max pass is exact, so the derived decision of which rows leave the fused pass is right; checked on the
CPU against the reference math. The fused kernel itself is checked per field in test_sampler_gpu.py."""

import inspect

import numpy as np
import pytest
import torch

from ringllm.engine.kernels.sampling import sample_rows
from ringllm.engine.sampler import ROW_FIELDS, RowTable
from ringllm.engine.sampler.rows import ADJUST, KERNEL, LEAVE_FUSED, LOGPROBS, PENALTY, RUNNER
from ringllm.engine.sampling_params import SamplingParams
from tests.helpers import make_sampler, sample_through_sink

ROWS = 64
LOGITS = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.5, 0.0])
# For each field that takes a row off the fused pass: a value that changes what the reference samples, from a
# seeded temperature-1 batch (every row its own seed) with token 0 in each row's output history.
CHANGED = {
    "top_k": dict(top_k=1),
    "top_p": dict(top_p=0.1),
    "min_p": dict(min_p=1.0),
    "repetition_penalty": dict(repetition_penalty=2.0, temperature=0.0),
    "presence_penalty": dict(presence_penalty=2.0, temperature=0.0),
    "frequency_penalty": dict(frequency_penalty=2.0, temperature=0.0),
    "has_bias": dict(logit_bias={4: 100.0}),
    "min_tokens": dict(min_tokens=2),
    "has_allowed": dict(allowed_token_ids=[4]),
    "has_bad_words": dict(bad_words_token_ids=[[0, 0]]),  # 0 after the output's 0: read from the token table
    "logprobs": dict(logprobs=2),
    "prompt_logprobs": dict(prompt_logprobs=1),  # the runner's: changes nothing the sampler does
}


def _sample(fields: dict):
    """What the reference path gives for ROWS rows of `fields` (tokens, and whether logprobs came back)."""
    s = make_sampler(ROWS, len(LOGITS), eos=[0])
    params = [SamplingParams(**{"temperature": 1.0, "seed": i, **fields}) for i in range(ROWS)]
    s.table.set(list(range(ROWS)), params, [1] * ROWS)
    s.req_tokens[:, :2] = torch.tensor([5, 0])  # prompt [5], then output [0]
    got = sample_through_sink(s, LOGITS.repeat(ROWS, 1), range(ROWS), [2] * ROWS)
    return s.table, got.tokens.tolist(), got.logprobs is not None


def test_every_field_has_a_stage_a_neutral_value_and_a_scenario():
    assert {f.name for f in ROW_FIELDS if f.stage != KERNEL} == set(CHANGED)
    assert {f.stage for f in ROW_FIELDS} <= {KERNEL, RUNNER, *LEAVE_FUSED}
    for f in ROW_FIELDS:  # a request's defaults are neutral (kernel fields are exact at any value)
        assert f.stage == KERNEL or f.value(SamplingParams(), 7) == f.neutral, f.name


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_a_non_neutral_value_takes_the_row_off_the_fused_pass_exactly_where_it_matters(name):
    """With the field neutral, every row is plain (the fused pass samples it exactly). With the field changed,
    the reference samples something else (other tokens, or logprobs): the fused pass, which reads only the
    kernel fields, would be wrong, and the derived decision must take every such row off it. A runner field
    changes nothing the sampler does and leaves the rows plain."""
    (field,) = [f for f in ROW_FIELDS if f.name == name]
    neutral_table, neutral_tokens, neutral_logprobs = _sample({})
    assert neutral_table.all_plain and neutral_table.plain(np.arange(ROWS)).all()
    table, tokens, logprobs = _sample(CHANGED[name])
    assert (table.host[name] != field.neutral).all()
    if field.stage == RUNNER:
        assert table.all_plain and (tokens, logprobs) == (neutral_tokens, neutral_logprobs)
        return
    if "temperature" in CHANGED[name]:  # greedy: the change must move the argmax
        _, neutral_tokens, _ = _sample({"temperature": 0.0})
    assert (tokens, logprobs) != (neutral_tokens, neutral_logprobs), "the scenario does not exercise the field"
    assert not table.all_plain and not table.plain(np.arange(ROWS)).any()
    assert RowTable.needs(field.stage, table.batch(np.arange(ROWS))).all()


def test_the_fused_kernel_takes_every_kernel_field_by_name():
    """The sampler hands the fused kernel the KERNEL columns by name: each must be a parameter of
    kernels.sampling.sample_rows (the GPU test checks that the kernel's draws depend on each)."""
    names = set(inspect.signature(sample_rows).parameters)
    kernel_fields = [f.name for f in ROW_FIELDS if f.stage == KERNEL]
    assert kernel_fields and set(kernel_fields) <= names
    assert make_sampler(2, 6).table.dev.keys() >= set(kernel_fields)


def test_all_plain_follows_the_rows_set_so_far():
    """`all_plain` (every row set so far needs only the fused pass) turns off the per-step host checks; a row
    with a penalty, filter, bias, min_tokens, allowed tokens, bad words or logprobs turns them back on, and a row
    keeps its last request's values until it is reused."""
    table = RowTable(4)
    assert table.all_plain
    table.set([0, 2], [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=3)], [1, 1])
    assert table.all_plain and table.plain(np.array([0, 2])).all()
    for special in (
        dict(presence_penalty=0.5),
        dict(top_p=0.9),
        dict(logprobs=1),
        dict(logit_bias={1: 2.0}),
        dict(min_tokens=1),
        dict(allowed_token_ids=[1]),
        dict(bad_words_token_ids=[[2]]),
    ):
        table.set([1], [SamplingParams(**special)], [1])
        assert not table.all_plain and table.plain(np.array([0, 1, 2])).tolist() == [True, False, True], special
        table.set([1], [SamplingParams()], [1])  # the row reused by a plain request
        assert table.all_plain, special
    table.set([3], [SamplingParams(prompt_logprobs=2)], [1])  # the runner's field: still plain for the sampler
    assert table.all_plain and table.held["prompt_logprobs"] == 1
    table.set([3], [SamplingParams(repetition_penalty=1.3)], [1])
    values = table.batch(np.array([0, 3]))
    assert RowTable.needs(PENALTY, values).tolist() == [False, True] and not RowTable.needs(ADJUST, values).any()
    assert table.logprobs_width(np.array([0, 3])) is None and table.held[LOGPROBS] == 0
