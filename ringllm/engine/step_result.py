"""A step's result as the engine reads it: the packed layout of the sampler's tokens (and logprobs, and prompt
logprobs) in one float32 tensor, and its unpacking (`StepResult.wait`, `file_prompt_logprobs`). The runner packs
and moves it (engine/runner/result_sink.py).

Layout of one packed row: [token] alone, or, when any row of the step asked for logprobs, [token, its logprob, k
top ids, k top logprobs] (zeros past what a row computed). float32 holds every token id exactly (vocabularies
are far below 2^24), so one tensor carries all of it. The step's prompt rows (prompt logprobs) follow its
sampled rows, packed the same way, except that a prompt row starts with the rank of its prompt token (the token
itself is known) rather than a token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ringllm.engine.core.plan import StepPlan
    from ringllm.engine.core.sequence import Sequence as Seq


@dataclass
class HostSample:
    tokens: np.ndarray  # [B] int64
    logprobs: list[float] | None  # [B] the chosen token's logprob, when a row asked for logprobs
    top: tuple[list, list] | None  # ([B][k] ids, [B][k] logprobs)
    prompt: np.ndarray | None = None  # [N, 2 + 2k] rows for prompt_logprob_positions(), packed the same way


@dataclass
class StepResult:
    """A launched step's sampled tokens, packed by `pack_sample` (on the host once `ready` has fired, or once
    `work` has finished on a CPU rank that receives them): `num_rows` sampled rows, then any prompt rows.
    `host` may be a buffer of a ResultRing: `wait` copies everything out of it and marks it read, after which
    the ring hands the buffer to a later step."""

    host: torch.Tensor
    top_k: int | None
    num_rows: int
    ready: torch.cuda.Event | None = None
    work: Any = None  # a torch.distributed Work, on a rank that receives the tokens
    on_read: Callable[[], None] | None = field(default=None, repr=False)  # its ResultRing's note, once read
    _sample: HostSample | None = field(default=None, init=False, repr=False)

    @property
    def read(self) -> bool:
        return self._sample is not None

    def wait(self) -> HostSample:
        if self._sample is not None:  # read already: its buffer may hold a later step's tokens by now
            return self._sample
        if self.ready is not None:
            self.ready.synchronize()
        elif self.work is not None:
            self.work.wait()
        everything = self.host.numpy()
        packed, prompt = everything[: self.num_rows], everything[self.num_rows :]
        tokens = packed[:, 0].astype(np.int64)
        if self.top_k is None:
            sample = HostSample(tokens, None, None)
        else:
            k = self.top_k
            top = None
            if k:
                top = (packed[:, 2 : 2 + k].astype(np.int64).tolist(), packed[:, 2 + k : 2 + 2 * k].tolist())
            sample = HostSample(tokens, packed[:, 1].tolist(), top, prompt.copy() if len(prompt) else None)
        self._sample = sample
        if self.on_read is not None:
            self.on_read()
        return sample


def packed_width(top_k: int | None) -> int:
    """Columns of a packed row (see the module docstring)."""
    return 1 if top_k is None else 2 + 2 * top_k


def prompt_logprob_positions(
    starts: np.ndarray, lens: np.ndarray, prompt_lens: np.ndarray, ks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(batch index, position) of every position a step computes whose next token is a prompt token, for the
    batch entries that asked for prompt logprobs (k >= 0); in batch order, then position order. The runner
    (packing) and `file_prompt_logprobs` (unpacking) both call this, so the prompt rows line up on both
    sides."""
    starts = starts.astype(np.int64)
    ends = np.minimum(starts + lens, prompt_lens - 1)
    counts = np.where(ks >= 0, np.maximum(ends - starts, 0), 0)
    index = np.repeat(np.arange(len(starts)), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return index, np.arange(int(counts.sum())) - first + np.repeat(starts, counts)


def file_prompt_logprobs(seqs: Sequence[Seq], plan: StepPlan, prompt: np.ndarray) -> None:
    """Files each prompt row of a step (`HostSample.prompt`) under its sequence: (logprob, top k) in
    `prompt_logprobs`, the prompt token's rank in `prompt_ranks`. A prompt recomputed after preemption yields its
    positions again; those already filed are skipped."""
    ks = np.array([-1 if s.params.prompt_logprobs is None else s.params.prompt_logprobs for s in seqs])
    index, pos = prompt_logprob_positions(plan.starts, plan.lens, np.array([s.num_prompt for s in seqs]), ks)
    width = (prompt.shape[1] - 2) // 2
    for row, i, p in zip(prompt, index, pos):
        seq, k = seqs[i], int(ks[i])
        if p == len(seq.prompt_logprobs):
            top = list(zip(row[2 : 2 + k].astype(np.int64).tolist(), row[2 + width : 2 + width + k].tolist()))
            seq.prompt_logprobs.append((float(row[1]), top))
            seq.prompt_ranks.append(int(row[0]))
