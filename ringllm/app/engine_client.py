"""One per app worker: claims this worker's ring pair, sends requests, and routes each StepOutput's tokens
to the waiting request streams."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ringllm.engine.logs import get_logger
from ringllm.ipc import messages as m
from ringllm.ipc.async_reader import AsyncRingReader
from ringllm.ipc.lifecycle import WorkerPair, claim_worker_index
from ringllm.ipc.ring import PeerDied, RingCorrupted, RingTimeout, pid_alive

log = get_logger("app")

# How long a request may wait for room in the request ring (the engine is slow or stalled) before it is
# refused with 503: the wait is asynchronous, the worker serves other requests meanwhile.
RING_WAIT_SECONDS = 10.0


class EngineDown(RuntimeError):
    """The engine process is gone or its rings failed."""


class EngineBusy(RuntimeError):
    """The request ring stayed full for RING_WAIT_SECONDS: the engine is not taking requests fast enough."""


@dataclass(frozen=True)
class Submission:
    """A generation the engine has taken: its outputs (m.TokenDelta items, or one m.RequestFailed) arrive on
    `outputs`; `abort()` tells the engine to stop it and free its KV."""

    rid: str
    outputs: asyncio.Queue
    abort: Callable[[], None]


class _Pending:
    """A frame waiting for room in the request ring: how much of it is written, and who waits for it."""

    __slots__ = ("done", "dropped", "frame", "sent")

    def __init__(self, frame: bytes, sent: int, done: asyncio.Future):
        self.frame, self.sent, self.done, self.dropped = frame, sent, done, False


class EngineClient:
    def __init__(self, engine_pid: int, num_workers: int, replica: int | None = None):
        """`replica`: which of the --dp-size engines this one is (its rids and failures name it)."""
        self.engine_pid = engine_pid
        self.replica = replica
        self.claim = claim_worker_index(engine_pid, num_workers)  # held until this process exits
        self.index = self.claim.index
        self.pair = WorkerPair(engine_pid, self.index)
        self.streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self.alive = True
        self.draining = False  # the engine said it is shutting down
        self._stats_waiters: list[asyncio.Future] = []
        self._backlog: deque[_Pending] = deque()  # frames waiting for room, in the order they were sent
        self._flusher: asyncio.Task | None = None
        self.reader = AsyncRingReader(self.pair.outputs, self._on_frames, asyncio.get_running_loop(), self._on_error)

    def new_rid(self) -> str:
        dp = "" if self.replica is None else f"r{self.replica}-"
        return f"{dp}w{self.index}-{os.getpid()}-{next(self._ids)}"

    def healthy(self) -> bool:
        return self.alive and pid_alive(self.engine_pid)

    def unavailable(self) -> str | None:
        """Why new requests cannot be served now (the engine is draining or gone), or None."""
        if self.draining:
            return m.SHUTTING_DOWN
        return None if self.healthy() else "the engine is not running"

    async def submit(self, rid: str, token_ids: list[int], sampling: m.Sampling) -> asyncio.Queue:
        """Sends a request to the engine and returns the queue its outputs arrive on. A full ring is waited
        out (up to RING_WAIT_SECONDS, then EngineBusy); cancelled or timed out before any of it was written,
        the request never reaches the engine."""
        why = self.unavailable()
        if why is not None:
            raise EngineDown(why)
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        pending = self._send(m.encode(m.Generate(rid, m.pack_ids(token_ids), sampling)))
        if pending is None:
            return queue
        try:
            await asyncio.wait_for(asyncio.shield(pending.done), RING_WAIT_SECONDS)
        except BaseException as e:  # timed out, cancelled, or the engine went away meanwhile
            self.streams.pop(rid, None)
            if pending.sent == 0:
                pending.dropped = True
            elif not pending.done.done():  # part of it is in the ring: the rest follows, then this abort
                self._send(m.encode(m.Abort(rid)))
            if isinstance(e, asyncio.TimeoutError):
                raise EngineBusy(
                    f"the engine took no new requests for {RING_WAIT_SECONDS:g} s (its request "
                    "ring stayed full); try again later"
                ) from None
            raise
        return queue

    def abort(self, rid: str) -> None:
        if self.streams.pop(rid, None) is not None and self.healthy():
            self._send(m.encode(m.Abort(rid)))

    def _send(self, frame: bytes) -> _Pending | None:
        """Writes a frame to the request ring now if it fits and none waits before it (None), else queues
        it, in order, for the flusher task (its _Pending). Never blocks the event loop."""
        sent = 0
        if not self._backlog:
            sent = self.pair.requests.try_write(frame)
            if sent == len(frame):
                return None
        pending = _Pending(frame, sent, asyncio.get_running_loop().create_future())
        self._backlog.append(pending)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return pending

    async def _flush(self) -> None:
        """Writes the backlog as the engine makes room, polling with a growing pause (a full ring is rare)."""
        pause = 2e-4
        while self._backlog:
            pending = self._backlog[0]
            if not pending.dropped:
                pending.sent = self.pair.requests.try_write(pending.frame, pending.sent)
                if pending.sent < len(pending.frame):
                    if not self.healthy():
                        self._fail_backlog(EngineDown("the engine is not running"))
                        return
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, 0.02)
                    continue
                if not pending.done.done():
                    pending.done.set_result(None)
            self._backlog.popleft()
            pause = 2e-4

    def _fail_backlog(self, exc: Exception) -> None:
        for pending in self._backlog:
            if not pending.done.done():
                pending.done.set_exception(exc)
                pending.done.exception()  # retrieved: a frame nobody awaits (an abort) must not warn
        self._backlog.clear()

    async def stats(self, command: str = "stats", timeout: float = 10.0) -> dict[str, float]:
        """Sends a control command ("stats", "profile_start", "profile_stop") and returns the engine's
        counters and gauges, which every control command answers with."""
        if not self.healthy():
            raise EngineDown("the engine is not running")
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self._send(m.encode(m.Control(command)))
        return await asyncio.wait_for(fut, timeout)

    def _on_frames(self, frames: list[bytes]) -> None:
        for frame in frames:
            msg = m.decode_to_app(frame)
            if isinstance(msg, m.StepOutput):
                for item in msg.items:
                    queue = self.streams.get(item.rid)
                    if queue is not None:
                        queue.put_nowait(item)
                        if item.finish_reason:
                            self.streams.pop(item.rid, None)
            elif isinstance(msg, m.EngineStats):
                while self._stats_waiters:
                    fut = self._stats_waiters.pop(0)
                    if not fut.done():
                        fut.set_result(msg.values)
                        break
            elif isinstance(msg, m.RequestFailed):
                queue = self.streams.pop(msg.rid, None)
                if queue is not None:
                    queue.put_nowait(msg)
            elif isinstance(msg, m.Draining):
                self.draining = True

    def _on_error(self, exc: Exception) -> None:
        """The output ring failed: every open stream ends with an error. The clients read why in general words;
        the ring's name and the engine's pid, which its error names, go to the log only (issue 28)."""
        self.alive = False
        engine = "engine" if self.replica is None else f"engine replica {self.replica}"
        why = m.CUT_BY_SHUTDOWN if self.draining else f"{engine} failure: {_public_reason(exc)}"
        if not self.draining:
            log.error("the engine's output ring failed", replica=self.replica, error=str(exc))
        for queue in self.streams.values():
            queue.put_nowait(m.RequestFailed("", why, 503))
        self.streams.clear()
        self._fail_backlog(EngineDown(why))

    def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self.reader.stop()
        self.claim.release()


def _public_reason(exc: Exception) -> str:
    """What a client may read of a ring failure: its kind, without the names and pids its message holds."""
    if isinstance(exc, PeerDied):
        return "the engine process died"
    if isinstance(exc, RingCorrupted):
        return "the engine's output was corrupted"
    if isinstance(exc, RingTimeout):
        return "the engine stopped taking output"
    return "the engine's output stopped"
