"""One per app worker: claims this worker's ring pair, sends requests, and routes each StepOutput's tokens
to the waiting request streams."""

from __future__ import annotations

import asyncio
import itertools
import os

from ipc import messages as m
from ipc.async_reader import AsyncRingReader
from ipc.lifecycle import WorkerPair, claim_worker_index
from ipc.ring import pid_alive


class EngineDown(RuntimeError):
    """The engine process is gone or its rings failed."""


class EngineClient:
    def __init__(self, engine_pid: int, num_workers: int):
        self.engine_pid = engine_pid
        self.index = claim_worker_index(engine_pid, num_workers)
        self.pair = WorkerPair(engine_pid, self.index)
        self.streams: dict[str, asyncio.Queue] = {}
        self._ids = itertools.count()
        self.alive = True
        self.draining = False  # the engine said it is shutting down
        self._stats_waiters: list[asyncio.Future] = []
        self.reader = AsyncRingReader(self.pair.outputs, self._on_frames, asyncio.get_running_loop(), self._on_error)

    def new_rid(self) -> str:
        return f"w{self.index}-{os.getpid()}-{next(self._ids)}"

    def healthy(self) -> bool:
        return self.alive and pid_alive(self.engine_pid)

    def unavailable(self) -> str | None:
        """Why new requests cannot be served now (the engine is draining or gone), or None."""
        if self.draining:
            return m.SHUTTING_DOWN
        return None if self.healthy() else "the engine is not running"

    def submit(self, rid: str, token_ids: list[int], sampling: m.Sampling) -> asyncio.Queue:
        why = self.unavailable()
        if why is not None:
            raise EngineDown(why)
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = queue
        self.pair.requests.write(m.encode(m.Generate(rid, m.pack_ids(token_ids), sampling)))
        return queue

    def abort(self, rid: str) -> None:
        if self.streams.pop(rid, None) is not None and self.healthy():
            self.pair.requests.write(m.encode(m.Abort(rid)))

    async def stats(self, command: str = "stats", timeout: float = 10.0) -> dict[str, float]:
        """Sends a control command ("stats", "profile_start", "profile_stop") and returns the engine's
        counters and gauges, which every control command answers with."""
        if not self.healthy():
            raise EngineDown("the engine is not running")
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(fut)
        self.pair.requests.write(m.encode(m.Control(command)))
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
        self.alive = False
        why = m.CUT_BY_SHUTDOWN if self.draining else f"engine failure: {exc}"
        for queue in self.streams.values():
            queue.put_nowait(m.RequestFailed("", why, 503))
        self.streams.clear()

    def close(self) -> None:
        self.reader.stop()
