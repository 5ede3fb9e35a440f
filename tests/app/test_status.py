"""app/status.py: what the operator's routes ask of the engine, over a scripted engine client."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ringllm.app.errors import ApiError
from ringllm.app.status import ServerStatus


class ScriptedClient:
    """An engine client whose control commands answer with `running` as the profiler's state."""

    def __init__(self, running: int):
        self.running, self.commands = running, []

    async def stats(self, command: str = "stats", timeout: float = 10.0) -> dict[str, float]:
        self.commands.append(command)
        return {"running": 0.0, "profiler_running": float(self.running)}


def status_over(client) -> ServerStatus:
    replicas = SimpleNamespace(first=0, clients=[client], heartbeats=[None])
    return ServerStatus(replicas, SimpleNamespace(model="m"), stall_timeout=10.0)  # type: ignore[arg-type]


def test_a_refused_profile_start_is_a_409_saying_why():
    """The engine refuses a profile once its trace budget is spent (engine/profiler.py); /start_profile says so
    instead of answering 200 for a profile that never ran."""
    client = ScriptedClient(running=0)
    with pytest.raises(ApiError) as e:
        asyncio.run(status_over(client).profiler("profile_start"))
    assert e.value.status == 409 and "restart the server" in e.value.message
    asyncio.run(status_over(client).profiler("profile_stop"))  # stopping nothing is not an error
    asyncio.run(status_over(ScriptedClient(running=1)).profiler("profile_start"))
    assert client.commands == ["profile_start", "profile_stop"]


class PublishedStats:
    """A heartbeat reader (ipc/heartbeat.py) whose engine last published `values`."""

    def __init__(self, **values: float):
        self.values = values

    def last_stats(self) -> dict[str, float]:
        return dict(self.values)


def test_the_load_is_the_replicas_last_published_stats_summed_without_asking_them():
    client = ScriptedClient(running=0)
    one = PublishedStats(running=1.0, waiting=0.0, kv_slots_total=100.0, kv_slots_used_by_requests=10.0)
    two = PublishedStats(running=2.0, waiting=3.0, kv_slots_total=100.0, kv_slots_used_by_requests=30.0)
    replicas = SimpleNamespace(first=0, clients=[client], heartbeats=[one, None, two])  # replica 1 is gone
    status = ServerStatus(replicas, SimpleNamespace(model="m"), stall_timeout=10.0)  # type: ignore[arg-type]
    assert status.load() == {"running": 3.0, "waiting": 3.0, "kv_slots_total": 200.0, "kv_slots_used_by_requests": 40.0}
    assert client.commands == []  # no round trip to an engine
