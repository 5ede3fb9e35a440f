"""A step's sampled tokens on their way out of the sampler: into the request-token table (the next step's
input, on the device) and to the engine (packed, engine/step_result.py, and moved to pinned host memory
without stalling the compute stream).

`ResultSink` is the one way out: the sampler always writes through it, either `put(sample)` (the sink lands
and packs the tokens with torch ops) or, where the sink offers a kernel target, a kernel that lands and packs
the tokens itself into `token_buffer` (`put_packed`). On one GPU where kernels store into pinned host memory,
that buffer is a ResultRing buffer the host reads directly: the step needs no copy at all (zero-copy)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ringllm.engine.kernels import sampling as sampling_kernels
from ringllm.engine.parallel import Layout, TokenBroadcasts
from ringllm.engine.step_result import StepResult, packed_width

if TYPE_CHECKING:
    from ringllm.engine.runner.inputs import StepIndices
    from ringllm.engine.sampler import SampleResult

PROMPT_LOGITS_CHUNK = 1024  # prompt positions projected onto the vocabulary at a time
RING_TOP_LOGPROBS = 20  # a result with up to this many top logprobs a row fits a ResultRing buffer


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


def pack_sample(sample: SampleResult, top_k: int | None) -> torch.Tensor:
    """[B, 1] token ids, or with logprobs [B, 2 + 2k]: token, its logprob, k top ids, k top logprobs."""
    if top_k is None:
        return sample.tokens[:, None].float().contiguous()
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
    """[N, 2 + 2k]: the rank of the next prompt token (`target`: 1 + how many tokens are likelier), its logprob,
    the top k ids and logprobs, for each prompt position in `hidden`; projected onto the vocabulary (`logits`) a
    chunk at a time, so a long prompt needs little memory."""
    n = len(target)
    out = torch.zeros(n, packed_width(top_k), dtype=torch.float32, device=hidden.device)
    for a in range(0, n, PROMPT_LOGITS_CHUNK):
        b = min(a + PROMPT_LOGITS_CHUNK, n)
        lp = torch.log_softmax(logits(hidden[a:b]).float(), dim=-1)
        mine = lp.gather(1, target[a:b].long()[:, None])
        out[a:b, 0] = (lp > mine).sum(1) + 1
        out[a:b, 1] = mine.squeeze(1)
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


class StepResults:
    """Where this rank's step results go: the pinned ResultRing and the copy stream (CUDA), whether a kernel may
    write a result straight into the ring (zero-copy: one device, where Triton stores into pinned memory), the
    token broadcasts of a parallel engine, and whether this rank reports tokens to the engine (rank 0). `sink`
    opens one step's ResultSink; `received` is the path of a rank that gets its tokens from the sampler."""

    def __init__(self, req_tokens: torch.Tensor, layout: Layout, max_rows: int):
        device = req_tokens.device
        self.req_tokens = req_tokens
        self.reports = layout.rank == 0
        self.broadcasts = TokenBroadcasts() if layout.is_sampler and layout.world_size > 1 else None
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # Pinned buffers reused step after step for the results coming out: up to pp_size steps are in flight.
        self.ring = None
        if device.type == "cuda":
            self.ring = ResultRing(layout.pp_size + 2, max_rows * packed_width(RING_TOP_LOGPROBS))
        self.zero_copy = (
            self.ring is not None and layout.world_size == 1 and sampling_kernels.writes_pinned_memory(device)
        )

    def sink(self, ix: StepIndices, top_k: int | None, prompt_rows: torch.Tensor | None) -> ResultSink:
        return ResultSink(self, ix, top_k, prompt_rows)

    def received(self, packed: torch.Tensor, top_k: int | None, num_rows: int, work: Any) -> StepResult | None:
        """A step's packed tokens this rank receives from the sampler (`work` pending): its result on rank 0."""
        if not self.reports:
            return None
        return copy_to_host(packed, top_k, num_rows, work, self.copy_stream, self.ring)


class ResultSink:
    """One step's sampled tokens, from the sampler to the request-token table and the host. The sampler writes
    through it exactly one of two ways:

    - `put(sample)`: the sink writes the kept rows' tokens into req_tokens[row, seq_len] (the next step's input)
      and packs the sample (with logprobs where the step asks: `top_k`);
    - where `kernel_target` is set, a kernel lands the kept rows' tokens there itself and writes the packed
      tokens into `token_buffer()`, then says so with `put_packed()`.

    `close` then appends the step's prompt rows, broadcasts to the ranks that need the tokens, and starts the
    copy to the host, or, where the kernel wrote into pinned host memory, only marks when the result is there."""

    def __init__(self, results: StepResults, ix: StepIndices, top_k: int | None, prompt_rows: torch.Tensor | None):
        self.results, self.ix, self.top_k, self.prompt_rows = results, ix, top_k, prompt_rows
        self._packed: torch.Tensor | None = None  # the packed tokens on the device
        self._direct: int | None = None  # the ResultRing buffer a kernel writes (zero-copy)
        self._written = False

    @property
    def num_rows(self) -> int:
        return len(self.ix.rows)

    @property
    def kernel_target(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(req_tokens, [B] keep flags) for a kernel that lands and packs the tokens itself; None where the packed
        result holds more than tokens (logprobs, prompt rows), which `put` packs."""
        return (self.results.req_tokens, self.ix.keep_flags) if self.top_k is None else None

    def token_buffer(self) -> torch.Tensor:
        """[B, 1] float32 for a kernel's packed tokens: a ResultRing buffer the host reads directly where
        zero-copy is possible (and one is free), else a new device tensor."""
        assert self.top_k is None and self.prompt_rows is None, "only plain tokens are packed by a kernel"
        results, n = self.results, self.num_rows
        if results.zero_copy:
            assert results.ring is not None  # zero-copy needs the ring
            taken = results.ring.take_direct(n)
            if taken is not None:
                self._direct, buffer = taken
                return buffer
        self._packed = torch.empty((n, 1), dtype=torch.float32, device=results.req_tokens.device)
        return self._packed

    def put_packed(self) -> None:
        """A kernel wrote token_buffer() and landed the kept rows' tokens."""
        assert self._direct is not None or self._packed is not None, "token_buffer() comes first"
        self._written = True

    def put(self, sample: SampleResult) -> None:
        """Lands the kept rows' tokens and packs the sample."""
        ix = self.ix
        self.results.req_tokens[ix.rows[ix.keep], ix.seq_lens[ix.keep]] = sample.tokens[ix.keep].int()
        self._packed = pack_sample(sample, self.top_k)
        self._written = True

    def close(self) -> StepResult | None:
        """The step's result on rank 0 (None on other ranks), on its way to the host."""
        assert self._written, "the sampler wrote nothing through the sink"
        results = self.results
        if self._direct is not None:
            assert results.ring is not None
            stream = torch.cuda.current_stream(results.req_tokens.device)
            return results.ring.landed(self._direct, self.num_rows, stream)
        packed = self._packed
        assert packed is not None
        if self.prompt_rows is not None:
            packed = torch.cat([packed, self.prompt_rows])
        if results.broadcasts is not None:
            results.broadcasts.send(packed)
        if not results.reports:
            return None
        return copy_to_host(packed, self.top_k, self.num_rows, None, results.copy_stream, results.ring)
