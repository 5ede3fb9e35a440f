"""The engine's heartbeat: a one-row shared table (ipc.shared_table) that the engine's loop writes each time it
turns, and in which it publishes its counters and gauges every PUBLISH_SECONDS.

An API worker reads it without asking the engine anything, so /health can tell an engine that has stopped
turning (hung in a step, SIGSTOPped, deadlocked) from one that is merely busy, and /metrics can answer at once
with the last published values when the engine does not answer a stats request. Times are CLOCK_MONOTONIC
(time.monotonic), which every process on the host shares."""

from __future__ import annotations

import time

from ringllm.ipc.lifecycle import own, segment_name
from ringllm.ipc.shared_table import SharedTable

BEATS, BEAT_AT, HAS_WORK, PUBLISHED_AT = 0, 1, 2, 3
STATS_AT = 8
# The engine's stats (EngineServer.stats) published for a reader that cannot wait for an answer.
STAT_KEYS = (
    "running",
    "waiting",
    "kv_slots_total",
    "kv_slots_used",
    "kv_slots_cached",
    "kv_slots_used_by_requests",
    "prefix_cache_hit_rate",
    "prefix_cache_hit_tokens",
    "generated_tokens",
    "prompt_tokens_computed",
    "preemptions",
    "aborted_orphans",  # a counter /metrics adds to the aborted requests: a stall must not make it dip
)
PUBLISH_SECONDS = 0.05


class HeartbeatWriter:
    """The engine's end: `beat()` every turn of its loop, `publish(stats)` when `due()`."""

    def __init__(self, owner_pid: int):
        self.table = SharedTable(segment_name(owner_pid, "heartbeat"), 1, create=True)
        own(self.table)
        self.row = self.table.row(0)

    def beat(self, has_work: bool) -> float:
        now = time.monotonic()
        row = self.row
        row[BEATS] += 1
        row[BEAT_AT] = now
        row[HAS_WORK] = 1.0 if has_work else 0.0
        return now

    def due(self, now: float) -> bool:
        return now - self.row[PUBLISHED_AT] >= PUBLISH_SECONDS

    def publish(self, stats: dict, now: float) -> None:
        for i, key in enumerate(STAT_KEYS):
            self.row[STATS_AT + i] = float(stats.get(key, 0))
        self.row[PUBLISHED_AT] = now


class HeartbeatReader:
    """An API worker's end."""

    def __init__(self, owner_pid: int):
        self.table = SharedTable(segment_name(owner_pid, "heartbeat"))
        self.row = self.table.row(0)

    def silent_for(self) -> float:
        """Seconds since the engine's loop last turned (0 before its first turn)."""
        last = self.row[BEAT_AT]
        return time.monotonic() - last if last else 0.0

    def has_work(self) -> bool:
        return self.row[HAS_WORK] > 0

    def last_stats(self) -> dict[str, float]:
        """The stats the engine published last."""
        return {key: self.row[STATS_AT + i] for i, key in enumerate(STAT_KEYS)}

    def close(self) -> None:
        self.table.close()
