"""A step's result, from the device to the engine: how the sampler's tokens (and logprobs, and prompt
logprobs) are packed into one float32 tensor, copied to the host without stalling the compute stream, and
unpacked.

Both sides of the packing live here: the runner packs (`pack_sample`, `pack_prompt_rows`, `copy_to_host`),
the engine unpacks (`StepResult.wait`, `file_prompt_logprobs`). Layout of one packed row: [token] alone, or,
when any row of the step asked for logprobs, [token, its logprob, k top ids, k top logprobs] (zeros past what
a row computed). float32 holds every token id exactly (vocabularies are far below 2^24), so one tensor carries
all of it. The step's prompt rows (prompt logprobs) follow its sampled rows, packed the same way."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ringllm.engine.core.plan import StepPlan
    from ringllm.engine.core.sequence import Sequence as Seq
    from ringllm.engine.sampler import SampleResult

PROMPT_LOGITS_CHUNK = 1024  # prompt positions projected onto the vocabulary at a time


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


class ResultRing:
    """A few pinned host buffers, each with the events of its copy, reused round-robin for the copies of
    steps' results: a fresh pinned tensor and two new events per step cost the host tens of microseconds, and
    a batch-1 decode step is host-bound.

    Why reuse is safe: a buffer is taken again only once the StepResult that last used it has been read
    (`wait` synchronized on its copy and copied everything out) or dropped unread (nobody reads it then, and a
    later copy into it queues behind the earlier one on the same copy stream). Its events are re-recorded only
    then too. The engine reads step N before it launches step N + depth + 1 (depth: steps in flight), so
    depth + 2 buffers never run short; when all are held (a caller keeping results unread) or a result is too
    large (long prompt logprobs), the copy gets a fresh buffer as before. Where kernels can store into pinned
    memory, a plain step's sampler writes its tokens into a buffer itself (`take_direct`, `landed`)."""

    def __init__(self, size: int, capacity: int):
        self.capacity = capacity  # float32 elements per buffer
        self.buffers = [torch.empty(capacity, dtype=torch.float32, pin_memory=True) for _ in range(size)]
        self.queued = [torch.cuda.Event() for _ in range(size)]  # where on the compute stream a copy starts
        self.copied = [torch.cuda.Event() for _ in range(size)]
        self.holders: list[weakref.ref | None] = [None] * size
        # Whether each buffer's last result was read, kept here rather than asked of the result: the engine
        # drops a result once read, and a collected result could no longer say so.
        self.read = [True] * size
        self.lent = [0] * size  # how many results each buffer has been lent to
        self.next = 0

    def take(self, packed: torch.Tensor) -> int | None:
        """A free buffer's index for a copy of `packed`, or None."""
        if packed.dtype != torch.float32:
            return None
        return self._free(packed.numel(), direct=False)

    def take_direct(self, num_rows: int) -> tuple[int, torch.Tensor] | None:
        """A free buffer for a [num_rows, 1] result that a kernel on the compute stream writes straight into
        (kernels.writes_pinned_memory): (its index, the [num_rows, 1] view to write), or None. Only a buffer
        whose last result was read qualifies: one dropped unread may still have a copy in flight on the copy
        stream, which the compute stream's write would not be ordered after."""
        i = self._free(num_rows, direct=True)
        return None if i is None else (i, self.buffers[i][:num_rows].view(num_rows, 1))

    def landed(self, slot: int, num_rows: int, stream: torch.cuda.Stream) -> StepResult:
        """The result of a step whose kernel wrote it into buffer `slot` (take_direct), ready once `stream`
        passes this point."""
        done = self.copied[slot]
        done.record(stream)
        return self.hold(slot, StepResult(self.buffers[slot][:num_rows].view(num_rows, 1), None, num_rows, done))

    def hold(self, slot: int, result: StepResult) -> StepResult:
        """Lends buffer `slot` to `result` until it is read (or, for copies only, dropped)."""
        self.holders[slot] = weakref.ref(result)
        self.read[slot] = False
        self.lent[slot] += 1
        # A partial holds the ring, not the result: no cycle, so a result dropped unread is freed at once.
        result.on_read = functools.partial(self._mark_read, slot, self.lent[slot])
        return result

    def _mark_read(self, slot: int, lent: int) -> None:
        if self.lent[slot] == lent:  # the buffer still belongs to the result that was read
            self.read[slot] = True

    def _free(self, numel: int, direct: bool) -> int | None:
        if numel > self.capacity:
            return None
        for _ in range(len(self.buffers)):
            i, self.next = self.next, (self.next + 1) % len(self.buffers)
            holder = self.holders[i]
            if self.read[i] or (not direct and (holder is None or holder() is None)):
                return i
        return None


def packed_width(top_k: int | None) -> int:
    """Columns of a packed row (see the module docstring)."""
    return 1 if top_k is None else 2 + 2 * top_k


def pack_sample(sample: SampleResult, top_k: int | None) -> torch.Tensor:
    """[B, 1] token ids, or with logprobs [B, 2 + 2k]: token, its logprob, k top ids, k top logprobs. The fused
    sampler may have packed the [B, 1] form already (`sample.packed`)."""
    if top_k is None:
        return sample.packed if sample.packed is not None else sample.tokens[:, None].float().contiguous()
    out = torch.zeros(len(sample.tokens), packed_width(top_k), dtype=torch.float32, device=sample.tokens.device)
    out[:, 0] = sample.tokens
    if sample.logprobs is not None:
        out[:, 1] = sample.logprobs
    if sample.top_ids is not None and sample.top_logprobs is not None and top_k:
        k = min(top_k, sample.top_ids.shape[1])
        out[:, 2 : 2 + k] = sample.top_ids[:, :k]
        out[:, 2 + top_k : 2 + top_k + k] = sample.top_logprobs[:, :k]
    return out


def pack_prompt_rows(
    logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, target: torch.Tensor, top_k: int
) -> torch.Tensor:
    """[N, 2 + 2k]: the next prompt token (`target`), its logprob, the top k ids and logprobs, for each prompt
    position in `hidden`; projected onto the vocabulary (`logits`) a chunk at a time, so a long prompt needs
    little memory."""
    n = len(target)
    out = torch.zeros(n, packed_width(top_k), dtype=torch.float32, device=hidden.device)
    for a in range(0, n, PROMPT_LOGITS_CHUNK):
        b = min(a + PROMPT_LOGITS_CHUNK, n)
        lp = torch.log_softmax(logits(hidden[a:b]).float(), dim=-1)
        t = target[a:b].long()
        out[a:b, 0] = t
        out[a:b, 1] = lp.gather(1, t[:, None]).squeeze(1)
        if top_k:
            values, ids = lp.topk(top_k, dim=-1)
            out[a:b, 2 : 2 + top_k], out[a:b, 2 + top_k :] = ids, values
    return out


def copy_to_host(
    packed: torch.Tensor,
    top_k: int | None,
    num_rows: int,
    work: Any,
    copy_stream: torch.cuda.Stream | None,
    ring: ResultRing | None = None,
) -> StepResult:
    """Starts the copy of a step's packed result to pinned host memory on `copy_stream` (into a buffer of
    `ring` where one is free), so that the compute stream goes on with the next step; without a copy stream
    (CPU) the tensor already is on the host."""
    if copy_stream is None:
        return StepResult(packed, top_k, num_rows, None, work)
    compute = torch.cuda.current_stream(packed.device)
    slot = ring.take(packed) if ring is not None else None
    if ring is None or slot is None:
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        done = torch.cuda.Event()
        copy_stream.wait_stream(compute)
    else:
        host = ring.buffers[slot][: packed.numel()].view(packed.shape)
        done, queued = ring.copied[slot], ring.queued[slot]
        queued.record(compute)  # after the step's sampling and packing
        copy_stream.wait_event(queued)
    # set_stream, not a `torch.cuda.stream` context: the same switch with fewer stream queries (host-bound)
    torch.cuda.set_stream(copy_stream)
    try:
        if work is not None:
            work.wait()  # makes the copy stream, not the compute stream, wait for the broadcast
        host.copy_(packed, non_blocking=True)
        done.record(copy_stream)
    finally:
        torch.cuda.set_stream(compute)
    result = StepResult(host, top_k, num_rows, done)
    return ring.hold(slot, result) if ring is not None and slot is not None else result


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
    """Files each prompt row of a step (`HostSample.prompt`) under its sequence. A prompt recomputed after
    preemption yields its positions again; those already filed are skipped."""
    ks = np.array([-1 if s.params.prompt_logprobs is None else s.params.prompt_logprobs for s in seqs])
    index, pos = prompt_logprob_positions(plan.starts, plan.lens, np.array([s.num_prompt for s in seqs]), ks)
    width = (prompt.shape[1] - 2) // 2
    for row, i, p in zip(prompt, index, pos):
        seq, k = seqs[i], int(ks[i])
        if p == len(seq.prompt_logprobs):
            top = list(zip(row[2 : 2 + k].astype(np.int64).tolist(), row[2 + width : 2 + width + k].tolist()))
            seq.prompt_logprobs.append((float(row[1]), top))
