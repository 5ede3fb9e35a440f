"""Where this process sits among the ranks of a tensor- and pipeline-parallel engine, and the collectives the
model and the runner call.

Rank r is tensor rank r % tp of pipeline stage r // tp. Rank 0 (stage 0, tensor rank 0) is the engine process:
it schedules and feeds every other rank the same step plans. The first tensor rank of the last stage samples
and broadcasts the tokens to the ranks that need them: stage 0 (its next step embeds them) and rank 0 (it
reports them). With a single rank every collective here is a no-op, so the one-GPU path pays nothing."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    nnodes: int = 1

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def sampler_rank(self) -> int:
        return (self.pp_size - 1) * self.tp_size

    @property
    def is_sampler(self) -> bool:
        return self.rank == self.sampler_rank

    def stage_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.tp_size, (stage + 1) * self.tp_size))

    @property
    def token_ranks(self) -> list[int]:
        """The sampler and every rank of stage 0."""
        return sorted(set(self.stage_ranks(0)) | {self.sampler_rank})

    @property
    def receives_tokens(self) -> bool:
        return self.world_size > 1 and self.rank in self.token_ranks and not self.is_sampler

    @property
    def remote_ranks(self) -> list[int]:
        """Ranks on hosts other than the engine's (ranks are split over hosts in order)."""
        return list(range(self.world_size // self.nnodes, self.world_size))

    def layer_range(self, num_layers: int) -> range:
        """This stage's contiguous layers; earlier stages take the remainder (the last one also runs the head)."""
        if self.pp_size > num_layers:
            raise ValueError(f"pp_size {self.pp_size} is larger than the model's {num_layers} layers")
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (self.pp_rank < extra))

    def check_heads(self, num_heads: int, num_kv_heads: int) -> None:
        tp = self.tp_size
        if num_heads % tp:
            raise ValueError(f"tp_size {tp} must divide the model's {num_heads} attention heads")
        if num_kv_heads % tp and tp % num_kv_heads:
            raise ValueError(f"tp_size {tp} and the model's {num_kv_heads} KV heads must divide one another")

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count) this tensor rank holds: a share when tp <= KV heads, else one replicated head."""
        if num_kv_heads >= self.tp_size:
            per = num_kv_heads // self.tp_size
            return self.tp_rank * per, per
        return self.tp_rank * num_kv_heads // self.tp_size, 1


_layout = Layout()
_tp_group = None
_token_group = None
_plan_group = None


def init(lay: Layout, backend: str, init_method: str, timeout_s: float = 600.0) -> None:
    """Joins the process group and makes this rank's groups. Every rank calls new_group for every group, in
    the same order: torch.distributed requires it even of non-members."""
    global _layout, _tp_group, _token_group, _plan_group
    dist.init_process_group(
        backend, init_method=init_method, rank=lay.rank, world_size=lay.world_size, timeout=timedelta(seconds=timeout_s)
    )
    for stage in range(lay.pp_size):
        group = dist.new_group(lay.stage_ranks(stage))
        if stage == lay.pp_rank:
            _tp_group = group
    group = dist.new_group(lay.token_ranks)
    _token_group = group if lay.rank in lay.token_ranks else None
    if lay.nnodes > 1:  # plan bytes for other hosts travel on the CPU
        _plan_group = dist.new_group([0] + lay.remote_ranks, backend="gloo")
    _layout = lay
    _connect_all(lay)


def _connect_all(lay: Layout) -> None:
    """One small operation on every group and pipeline link now, so that no communicator is set up lazily
    later, in the middle of steps whose kernels are already queued (or inside a CUDA graph capture)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.zeros(1, device=device)
    dist.all_reduce(t)
    tp_all_reduce(t)
    if _token_group is not None:
        dist.broadcast(t, lay.sampler_rank, group=_token_group)
    if not lay.is_first_stage:
        recv_from_prev_stage([t])
    if not lay.is_last_stage:
        for work in send_to_next_stage([t]):
            work.wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shutdown() -> None:
    """Leaves the process group. Call it once this rank's queued device work is done and its peers have exited
    or are finishing theirs. NCCL communicators are aborted, not destroyed: destroying them is collective in
    some NCCL versions and waits forever for a peer that has already gone."""
    global _layout, _tp_group, _token_group, _plan_group
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    _layout, _tp_group, _token_group, _plan_group = Layout(), None, None, None


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _layout.tp_size > 1:
        dist.all_reduce(x, group=_tp_group)
    return x


def tp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenates every tensor rank's [B, n] along the columns, in rank order."""
    tp = _layout.tp_size
    if tp == 1:
        return x
    rows, cols = x.shape
    out = torch.empty((tp * rows, cols), dtype=x.dtype, device=x.device)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x.contiguous(), group=_tp_group)
    return out.view(tp, rows, cols).transpose(0, 1).reshape(rows, tp * cols)


def send_to_next_stage(tensors: list[torch.Tensor]) -> list:
    """Asynchronous sends to the same tensor rank of the next stage; keep the tensors alive until they finish."""
    peer = _layout.rank + _layout.tp_size
    return [dist.isend(t.contiguous(), peer) for t in tensors]


def recv_from_prev_stage(tensors: list[torch.Tensor]) -> None:
    peer = _layout.rank - _layout.tp_size
    for work in [dist.irecv(t, peer) for t in tensors]:
        assert work is not None  # None only for a rank outside the group; both peers are in the default one
        work.wait()


def broadcast_tokens(buf: torch.Tensor):
    """From the sampler to stage 0 and rank 0; returns the pending work (wait before reading `buf`)."""
    return dist.broadcast(buf, _layout.sampler_rank, group=_token_group, async_op=True)


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0 sends `data` to the ranks on other hosts, which pass None and get it back."""
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
    dist.broadcast(size, 0, group=_plan_group)
    buf = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data is not None
        else torch.empty(int(size), dtype=torch.uint8)
    )
    dist.broadcast(buf, 0, group=_plan_group)
    return data if data is not None else buf.numpy().tobytes()


def all_ranks_min(value: int, device: torch.device) -> int:
    if _layout.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


# ---- token landing: the sampled tokens reach the ranks that embed or report them ----
MAX_TOKEN_WAITS = 16
MAX_PENDING_SENDS = 8


class TokenBroadcasts:
    """The sampler's side: broadcasts each step's packed tokens without waiting, keeping at most
    MAX_PENDING_SENDS in flight (with their buffers alive until they finish)."""

    def __init__(self) -> None:
        self._pending: deque[tuple[Any, torch.Tensor]] = deque()

    def send(self, packed: torch.Tensor) -> None:
        self._pending.append((broadcast_tokens(packed), packed))
        while len(self._pending) > MAX_PENDING_SENDS:
            self._pending.popleft()[0].wait()


@dataclass
class _TokenWait:
    """A token broadcast this rank receives, written into the token table before a later step reads its rows."""

    work: Any
    buf: torch.Tensor
    rows_host: np.ndarray
    keep: torch.Tensor  # indices into buf of the rows whose token is kept
    rows: torch.Tensor
    pos: torch.Tensor


class TokenLanding:
    """A receiving rank's side (stage 0 and rank 0, not the sampler): each step's broadcast is received
    asynchronously and its tokens are written into `req_tokens[row, pos]` only when a later step needs them."""

    def __init__(self, req_tokens: torch.Tensor):
        self.req_tokens = req_tokens
        self._waits: deque[_TokenWait] = deque()

    def __bool__(self) -> bool:
        return bool(self._waits)

    def receive(
        self, shape: tuple[int, int], rows_host: np.ndarray, keep: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor
    ) -> tuple[torch.Tensor, Any]:
        """Starts receiving one step's packed tokens; returns (buffer, pending work). The kept rows' tokens
        are landed at (rows, pos) later."""
        buf = torch.empty(shape, dtype=torch.float32, device=self.req_tokens.device)
        work = broadcast_tokens(buf)
        self._waits.append(_TokenWait(work, buf, rows_host, keep, rows, pos))
        return buf, work

    def land(self, *touched_rows: np.ndarray) -> None:
        """Writes tokens into req_tokens before a step reads (or rewrites) the `touched_rows`: every broadcast
        up to the last one that touches them, in order. Older ones are landed too once too many are waiting
        (they have long finished by then)."""
        touched = np.zeros(len(self.req_tokens), dtype=bool)
        for rows in touched_rows:
            touched[rows] = True
        last = max((i for i, w in enumerate(self._waits) if touched[w.rows_host].any()), default=-1)
        last = max(last, len(self._waits) - MAX_TOKEN_WAITS - 1)
        for _ in range(last + 1):
            w = self._waits.popleft()
            w.work.wait()
            self.req_tokens[w.rows, w.pos] = w.buf[w.keep, 0].int()
