"""An API worker's view of the engine replicas (`--dp-size N`): one EngineClient (ring pair) and heartbeat
per engine process, which one a request goes to (app/router.py), whether the server can serve (/health),
and the replicas' stats summed for /metrics.

A replica that dies does not stop the server while another serves: its requests end with a 503 error (its
EngineClient fails them as its ring reader fails), routing skips it, /health stays 200 and names the
degraded state in its body, and /metrics shows `ringllm_dp_replicas_serving` below `ringllm_dp_replicas`
for an alert. Why: the other replicas' requests in flight and their warm caches are worth keeping, and a
restart of the whole server (which an orchestrator does when /health turns 503) would drop them; the
operator restarts at a time of their choosing. /health turns 503 once no replica can serve, and the server
exits (status 1) once every replica has exited."""

from __future__ import annotations

import asyncio
import functools

import posix_ipc
from prometheus_client.core import GaugeMetricFamily

from ringllm.app.engine_client import EngineClient, EngineDown, Submission
from ringllm.app.router import PrefixRouter
from ringllm.ipc import messages as m
from ringllm.ipc.heartbeat import HeartbeatReader
from ringllm.ipc.ring import pid_alive


class Replicas:
    def __init__(self, engine_pids: list[int], num_workers: int, kv_slots: int, stall_timeout: float):
        self.pids = engine_pids
        self.stall_timeout = stall_timeout
        self.clients: list[EngineClient | None] = []
        self.heartbeats: list[HeartbeatReader | None] = []
        for r, pid in enumerate(engine_pids):
            client, beat = self._open(r, pid, num_workers)
            self.clients.append(client)
            self.heartbeats.append(beat)
        self.first = next((r for r, c in enumerate(self.clients) if c is not None), None)
        if self.first is None:
            raise EngineDown(f"no engine replica is running (pids {engine_pids})")
        self.router = PrefixRouter(len(engine_pids), kv_slots)

    def _open(self, r: int, pid: int, num_workers: int) -> tuple[EngineClient | None, HeartbeatReader | None]:
        """Replica r's client and heartbeat; (None, None) for a replica of several that is gone already (an
        API worker respawned after it died: its segments are named after a process that no longer exists)."""
        client = None
        try:
            client = EngineClient(pid, num_workers, r if len(self.pids) > 1 else None)
            return client, HeartbeatReader(pid)
        except Exception as e:
            if client is not None:
                client.close()
            if len(self.pids) > 1 and not pid_alive(pid):
                return None, None
            if isinstance(e, posix_ipc.ExistentialError):  # its segments are gone: it exited, or is exiting
                raise EngineDown(f"the engine (pid {pid}) is not running: its shared memory is gone") from e
            raise  # a live engine that cannot be opened is a bug

    async def submit(self, token_ids: list[int], sampling: m.Sampling) -> Submission:
        """Sends a generation to the replica `pick` chooses (the serving layer's EngineConnection)."""
        client = self.pick(token_ids)
        rid = client.new_rid()
        outputs = await client.submit(rid, token_ids, sampling)
        return Submission(rid, outputs, functools.partial(client.abort, rid))

    def pick(self, ids: list[int]) -> EngineClient:
        """The client of the replica for prompt `ids`. With one replica, that one (it answers for itself
        if it cannot serve); with several, one that serves now, else EngineDown naming why none does."""
        if len(self.clients) == 1:
            return self.clients[0]  # type: ignore[return-value]  # one replica is never None
        whys = [self.unavailable(r) for r in range(len(self.clients))]
        if all(whys):
            raise EngineDown(_none_serves(whys))
        loads = [None if why or c is None else len(c.streams) for c, why in zip(self.clients, whys)]
        return self.clients[self.router.choose(ids, loads)]  # type: ignore[return-value]  # it serves

    def unavailable(self, r: int) -> str | None:
        """Why replica r takes no new requests (draining, gone, or its loop stalled), or None."""
        client = self.clients[r]
        if client is None:
            return "the engine is not running"
        why, beat = client.unavailable(), self.heartbeats[r]
        if why is None and beat is not None and (silent := beat.silent_for()) >= self.stall_timeout:
            busy = "with requests to run" if beat.has_work() else "while idle"
            why = f"the engine has made no progress for {silent:.0f} s {busy}"
        return why

    def health(self) -> tuple[str | None, dict]:
        """(why the server cannot serve, or None) and the per-replica state for /health's body."""
        whys = [self.unavailable(r) for r in range(len(self.clients))]
        states = [
            # no pid: /health is public, and process ids are the operator's (issue 28); the log names them
            {"replica": r, "serving": why is None, **({"error": why} if why else {})}
            for r, why in enumerate(whys)
        ]
        serving = sum(why is None for why in whys)
        body = {
            "status": "ok" if serving == len(whys) else "degraded" if serving else "unavailable",
            "replicas_serving": serving,
            "replicas": states,
        }
        if any(why == m.SHUTTING_DOWN for why in whys):
            return m.SHUTTING_DOWN, body  # a drain reaches every replica: the server is shutting down
        return (_none_serves(whys) if not serving else None), body

    async def stats(self, wait: float) -> list[dict[str, float] | None]:
        """Each replica's stats: a round trip when its loop turns, else what its heartbeat last published;
        None for a replica that is gone."""

        async def one(r: int) -> dict[str, float] | None:
            client, beat = self.clients[r], self.heartbeats[r]
            if client is None or beat is None or not client.healthy():
                return None
            values = beat.last_stats()
            if beat.silent_for() < 1.0:
                try:
                    values = await client.stats(timeout=wait)
                except (EngineDown, asyncio.TimeoutError):
                    pass
            return values

        return list(await asyncio.gather(*(one(r) for r in range(len(self.clients)))))

    def close(self) -> None:
        for client in self.clients:
            if client is not None:
                client.close()
        for beat in self.heartbeats:
            if beat is not None:
                beat.close()


def _none_serves(whys: list[str | None]) -> str:
    return "no engine replica can serve: " + "; ".join(f"replica {r}: {why}" for r, why in enumerate(whys))


def merge_stats(per_replica: list[dict[str, float] | None]) -> dict[str, float]:
    """The server's engine stats: every counter, gauge and histogram bucket summed over the replicas that
    answered; the hit rate recomputed from the summed hits and queries (a ratio does not add)."""
    merged: dict[str, float] = {}
    for values in per_replica:
        for key, value in (values or {}).items():
            merged[key] = merged.get(key, 0.0) + value
    if "prefix_cache_query_tokens" in merged:
        merged["prefix_cache_hit_rate"] = merged.get("prefix_cache_hit_tokens", 0.0) / max(
            1.0, merged["prefix_cache_query_tokens"]
        )
    elif "prefix_cache_hit_rate" in merged:  # heartbeat values only: no query count to weigh them by
        merged["prefix_cache_hit_rate"] /= sum(v is not None for v in per_replica)
    return merged


PER_REPLICA = (  # (series, help, stats key): the few worth a label per replica
    ("ringllm_dp_replica_num_requests_running", "Requests being computed, per replica.", "running"),
    ("ringllm_dp_replica_num_requests_waiting", "Requests waiting for admission, per replica.", "waiting"),
    (
        "ringllm_dp_replica_prefix_cache_hit_tokens",
        "Prompt tokens found in the replica's prefix cache.",
        "prefix_cache_hit_tokens",
    ),
    (
        "ringllm_dp_replica_prefix_cache_query_tokens",
        "Prompt tokens looked up in the replica's prefix cache.",
        "prefix_cache_query_tokens",
    ),
    ("ringllm_dp_replica_generation_tokens", "Tokens generated by the replica.", "generated_tokens"),
)


class ReplicaCollector:
    """A prometheus_client collector for the scrape being rendered: how many replicas serve, and a few
    per-replica values labelled `replica` (gauges: a replica that restarts would reset a counter)."""

    def __init__(self, model: str):
        self.model = model
        self.per_replica: list[dict[str, float] | None] = []
        self.serving = 0

    def collect(self):
        family = GaugeMetricFamily("ringllm_dp_replicas", "Engine replicas (--dp-size).", labels=["model_name"])
        family.add_metric([self.model], len(self.per_replica))
        yield family
        family = GaugeMetricFamily(
            "ringllm_dp_replicas_serving", "Engine replicas taking requests.", labels=["model_name"]
        )
        family.add_metric([self.model], self.serving)
        yield family
        for name, help_text, key in PER_REPLICA:
            family = GaugeMetricFamily(name, help_text, labels=["model_name", "replica"])
            for r, values in enumerate(self.per_replica):
                if values is not None and key in values:
                    family.add_metric([self.model, str(r)], values[key])
            yield family
