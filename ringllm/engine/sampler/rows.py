"""Every per-request-row value the sampler and the runner read, in one table (`ROW_FIELDS`), and the table
itself (`RowTable`): host arrays for every field, device tensors for those the sampler's math or the fused
kernel read, both indexed by request row and written once when a request is admitted.

Each field carries its stage, what it asks of a step, and its neutral value: the value at which the fused
Gumbel-max pass (engine/kernels/sampling.py) samples the row exactly. A field the kernel reads itself
(`KERNEL`) is exact at any value. Which rows need more than the fused pass is derived from this table
(`RowTable.plain`), never listed by hand: a new field is honoured by the decision as soon as its entry is here.
Fields of the request contract that no row reads are in `NOT_SAMPLED`, with who handles them instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ringllm.engine.sampling_params import SamplingParams

# Stages: what a row whose value is not neutral needs beyond the fused pass.
KERNEL = "kernel"  # nothing: the fused kernel reads the field itself (any value is exact)
PENALTY = "penalty"  # the row's token history (repetition, presence, frequency penalties)
FILTER = "filter"  # top-k / top-p / min-p: the reference path samples the row
ADJUST = "adjust"  # a change to the row's logits before sampling (logit_bias, min_tokens, allowed and bad words)
LOGPROBS = "logprobs"  # logprobs of the row's token and its top k
RUNNER = "runner"  # nothing of the sampler: the runner reads it (prompt logprobs)
LEAVE_FUSED = (PENALTY, FILTER, ADJUST, LOGPROBS)  # the stages that take a row off the fused pass


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class RowField:
    name: str  # the table's column
    dtype: type  # numpy dtype of the column
    param: str | None  # the SamplingParams field it comes from; None: the prompt length
    stage: str
    neutral: Any = 0  # the value at which the fused pass is exact (and the value of a row never set)
    convert: Callable[[Any], Any] = _same  # the parameter's value -> the column's
    device: bool = True  # also on the sampler's device (its math or the fused kernel reads it there)

    def value(self, params: SamplingParams, prompt_len: int) -> Any:
        return prompt_len if self.param is None else self.convert(getattr(params, self.param))


ROW_FIELDS: tuple[RowField, ...] = (
    RowField("temperature", np.float32, "temperature", KERNEL),
    RowField("seed", np.int64, "seed", KERNEL, convert=lambda s: 0 if s is None else s),
    RowField("has_seed", np.bool_, "seed", KERNEL, False, lambda s: s is not None),
    RowField("prompt_len", np.int64, None, KERNEL),  # a seeded row's output index is seq_len - prompt_len
    RowField("top_k", np.int64, "top_k", FILTER, 0, lambda k: max(k, 0)),  # -1 or 0: off
    RowField("top_p", np.float32, "top_p", FILTER, 1.0),
    RowField("min_p", np.float32, "min_p", FILTER, 0.0),
    RowField("repetition_penalty", np.float32, "repetition_penalty", PENALTY, 1.0),
    RowField("presence_penalty", np.float32, "presence_penalty", PENALTY, 0.0),
    RowField("frequency_penalty", np.float32, "frequency_penalty", PENALTY, 0.0),
    # logit_bias is sparse: the table holds whether a row has one; the math reads the row's own map
    RowField("has_bias", np.bool_, "logit_bias", ADJUST, False, bool, device=False),
    # min_tokens: stop tokens are banned while fewer outputs are out (the math reads stop_token_ids, ignore_eos)
    RowField("min_tokens", np.int64, "min_tokens", ADJUST, 0),
    # allowed_token_ids and bad words are sparse too: whether a row has them; the math reads the row's lists
    RowField("has_allowed", np.bool_, "allowed_token_ids", ADJUST, False, lambda ids: ids is not None, device=False),
    RowField("has_bad_words", np.bool_, "bad_words_token_ids", ADJUST, False, bool, device=False),
    RowField("logprobs", np.int64, "logprobs", LOGPROBS, -1, lambda k: -1 if k is None else k, device=False),
    RowField("prompt_logprobs", np.int64, "prompt_logprobs", RUNNER, -1, lambda k: -1 if k is None else k, False),
)

# Request fields no row holds, and where they are handled instead.
NOT_SAMPLED = {
    "max_tokens": "the engine's stop check (engine/engine.py) and the scheduler, which stops scheduling a row",
    "stop": "the text layer: stop strings are matched on the detokenized text",
    "ignore_eos": "the engine's stop check (and min_tokens' banned tokens, read off the row's parameters)",
    "stop_token_ids": "the engine's stop check (and min_tokens' banned tokens, read off the row's parameters)",
    "structured_outputs": "engine/grammar.py: the grammar's token masks reach the sampler as a GrammarMask",
    "bad_words": "the side that holds the tokenizer (text/bad_words.py): the sampler reads bad_words_token_ids",
    "priority": "the scheduler's admission order and its choice of whom to preempt (--scheduling-policy)",
    "truncate_prompt_tokens": "where the prompt is tokenized (the API worker, the offline LLM), before the engine",
    "truncation_side": "where the prompt is tokenized, with truncate_prompt_tokens",
}

_TORCH = {np.float32: torch.float32, np.int64: torch.int64, np.bool_: torch.bool}
_BY_STAGE = {s: [(f.name, f.neutral) for f in ROW_FIELDS if f.stage == s] for s in (*LEAVE_FUSED, RUNNER)}


class RowTable:
    """The row fields of every request row: `host[name]` (numpy, all fields), `dev[name]` (on the sampler's
    device, the fields marked `device`; none without a device) and `params[row]` (the request's parameters, for
    the sparse ones: logit_bias, stop tokens). A row keeps its last request's values until it is reused."""

    def __init__(self, max_rows: int, device: torch.device | None = None):
        self.max_rows = max_rows
        self.device = device
        self.host: dict[str, np.ndarray] = {f.name: np.full(max_rows, f.neutral, dtype=f.dtype) for f in ROW_FIELDS}
        self.dev: dict[str, torch.Tensor] = {}
        if device is not None:
            self.dev = {
                f.name: torch.full((max_rows,), f.neutral, dtype=_TORCH[f.dtype], device=device)
                for f in ROW_FIELDS
                if f.device
            }
        self.params: list[SamplingParams | None] = [None] * max_rows
        # Rows whose value of each field is not neutral, recounted on every admission: most steps ask whether
        # any row holds logprobs or prompt logprobs, and a batch-1 decode step is host-bound.
        self.held = dict.fromkeys(self.host, 0)
        self.all_plain = True  # no row needs more than the fused pass: a step skips every per-row check

    def set(self, rows: list[int], params: list[SamplingParams], prompt_lens: list[int]) -> None:
        """Writes the fields of newly admitted rows."""
        index = torch.tensor(rows, dtype=torch.int64).to(self.device) if self.dev else None
        for f in ROW_FIELDS:
            values = [f.value(p, n) for p, n in zip(params, prompt_lens)]
            self.host[f.name][rows] = values
            if f.name in self.dev:
                self.dev[f.name][index] = torch.tensor(values, dtype=_TORCH[f.dtype]).to(self.device)
            self.held[f.name] = int((self.host[f.name] != f.neutral).sum())
        for row, p in zip(rows, params):
            self.params[row] = p
        self.all_plain = not any(self.held[name] for stage in LEAVE_FUSED for name, _ in _BY_STAGE[stage])

    def clear(self) -> None:
        """Every row back to its neutral values, as built (the start-up warm-up's requests leave no trace)."""
        for f in ROW_FIELDS:
            self.host[f.name].fill(f.neutral)
            if f.name in self.dev:
                self.dev[f.name].fill_(f.neutral)
        self.params = [None] * self.max_rows
        self.held = dict.fromkeys(self.host, 0)
        self.all_plain = True

    def logprobs_width(self, rows: np.ndarray) -> int | None:
        """The most top logprobs any of these rows asked for; None when none asked for logprobs (most steps:
        then no row holds any, and this is one lookup)."""
        if not self.held["logprobs"]:
            return None
        want = self.host["logprobs"][rows]
        return int(want.max()) if (want >= 0).any() else None

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The host values of a step's rows, by field."""
        return {name: column[rows] for name, column in self.host.items()}

    @staticmethod
    def needs(stage: str, values: dict[str, np.ndarray]) -> np.ndarray:
        """Per row of `values` (RowTable.batch): whether some field of `stage` is not neutral."""
        out = np.zeros(len(values["temperature"]), dtype=bool)
        for name, neutral in _BY_STAGE[stage]:
            out |= values[name] != neutral
        return out

    def plain(self, rows: np.ndarray) -> np.ndarray:
        """Per row: whether the fused Gumbel-max pass samples it exactly (every field of the stages that leave
        it neutral)."""
        values = self.batch(rows)
        out = np.ones(len(rows), dtype=bool)
        for stage in LEAVE_FUSED:
            out &= ~self.needs(stage, values)
        return out
