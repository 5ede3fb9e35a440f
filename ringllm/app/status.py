"""What the operator's routes ask of the engines: /health (can the server serve?), /metrics (the engines' stats
with every API worker's request metrics) and the profiler's start and stop."""

from __future__ import annotations

import asyncio

from ringllm.app.engine_client import EngineDown
from ringllm.app.errors import ApiError
from ringllm.app.metrics import Metrics
from ringllm.app.replicas import ReplicaCollector, Replicas, merge_stats

METRICS_WAIT_SECONDS = 2.0


class ServerStatus:
    def __init__(self, replicas: Replicas, metrics: Metrics, stall_timeout: float):
        self.replicas, self.metrics, self.stall_timeout = replicas, metrics, stall_timeout
        first = replicas.first  # replica 0, unless this worker started after it died
        assert first is not None  # Replicas raises EngineDown when none is open
        self.client, self.heartbeat = replicas.clients[first], replicas.heartbeats[first]
        self.several = len(replicas.clients) > 1
        self.per_replica = ReplicaCollector(metrics.model) if self.several else None
        if self.per_replica is not None:
            metrics.registry.register(self.per_replica)

    def health(self) -> tuple[str | None, dict | None]:
        """(why the server cannot serve, or None; the body of a 200: with --dp-size N, each replica's state)."""
        if self.several:
            return self.replicas.health()  # 200 while one replica serves; the body says which
        assert self.client is not None  # the one replica, open
        return self.client.unavailable() or self._engine_stalled(), None

    def _engine_stalled(self) -> str | None:
        """Why the engine counts as hung: its loop, which turns every step and every idle poll, has not turned
        for --engine-stall-timeout seconds (ipc/heartbeat.py)."""
        assert self.heartbeat is not None
        silent = self.heartbeat.silent_for()
        if silent < self.stall_timeout:
            return None
        busy = "with requests to run" if self.heartbeat.has_work() else "while idle"
        return f"the engine has made no progress for {silent:.0f} s {busy}"

    def load(self) -> dict[str, float]:
        """The engines' stats as they last published them in their heartbeats, summed over the replicas: at
        once, with no round trip (an ORCA load report on an answer, app/orca.py)."""
        return merge_stats([beat.last_stats() for beat in self.replicas.heartbeats if beat is not None])

    async def render_metrics(self) -> bytes:
        """The engine's values from a stats round trip (exact: it follows every message sent before); when the
        engine's loop has not turned for a second, or does not answer within METRICS_WAIT_SECONDS, the values
        it last published in its heartbeat, at once. With --dp-size N, the replicas' stats summed (each asked
        at once, or read from its heartbeat), plus how many serve and a few values per replica."""
        if self.per_replica is not None:
            per_replica = await self.replicas.stats(METRICS_WAIT_SECONDS)
            self.per_replica.per_replica = per_replica
            replicas = range(len(self.replicas.clients))
            self.per_replica.serving = sum(self.replicas.unavailable(r) is None for r in replicas)
            return self.metrics.render(merge_stats(per_replica))
        assert self.client is not None and self.heartbeat is not None
        engine = self.heartbeat.last_stats()
        if self.heartbeat.silent_for() < 1.0:
            try:
                engine = await self.client.stats(timeout=METRICS_WAIT_SECONDS)
            except (EngineDown, asyncio.TimeoutError):
                pass
        return self.metrics.render(engine)

    async def profiler(self, command: str) -> None:
        """ "profile_start" or "profile_stop" to the engine (replica 0's, or the first that serves)."""
        assert self.client is not None
        try:
            stats = await self.client.stats(command)
        except EngineDown as e:
            raise ApiError(503, str(e), "server_error") from None
        except asyncio.TimeoutError:
            raise ApiError(
                503, "the engine did not answer within 10 s (it may be writing a profiler trace)", "server_error"
            ) from None
        if command == "profile_start" and not stats.get("profiler_running"):
            raise ApiError(
                409,
                "profile refused: the engine has written its --profile-max-mb of profiler traces; restart the "
                "server to profile again",
            )
