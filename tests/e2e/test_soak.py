"""Soak: thousands of mixed requests against one server for a few minutes, with random disconnects and bad
bodies mixed in. Afterwards no request holds a KV slot, nothing waits, no segment is left over and the
processes' memory has not grown past a bound. A second soak mixes in abuse (hundreds of silent connections held
open, the profiler started again and again) and requires /health to answer within a second throughout.
Marked `soak`: `scripts/soak.sh` runs them (RINGLLM_SOAK_SECONDS, default 180), ordinary test runs skip them."""

import asyncio
import os
import random
import socket
import time
from collections import Counter

import httpx
import pytest

from ringllm.ipc.lifecycle import leftover_segments
from tests.helpers import metric, probe_health, process_tree, rss_mb, start_server, stop_server, wait_for_metric

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("RINGLLM_SOAK_SECONDS", "180"))
CONCURRENCY = 24
RSS_GROWTH_LIMIT_MB = 150


async def _one(client: httpx.AsyncClient, rng: random.Random, outcomes: Counter) -> None:
    kind = rng.choice(["complete", "chat", "stream", "stream-disconnect", "timeout-disconnect", "bad", "n"])
    body = {
        "prompt": "soak " * rng.randint(1, 40),
        "max_tokens": rng.randint(1, 48),
        "temperature": rng.random(),
        "ignore_eos": rng.random() < 0.5,
    }
    try:
        if kind == "chat":
            r = await client.post(
                "/v1/chat/completions",
                json={
                    "messages": [{"role": "user", "content": "hi " * rng.randint(1, 20)}],
                    "max_tokens": rng.randint(1, 32),
                },
            )
            outcomes[f"chat {r.status_code}"] += 1
        elif kind.startswith("stream"):
            async with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                async for i, _ in _aenumerate(r.aiter_lines()):
                    if kind == "stream-disconnect" and i >= rng.randint(1, 6):
                        break  # the client goes away mid-stream
            outcomes[f"{kind} {r.status_code}"] += 1
        elif kind == "timeout-disconnect":
            try:
                await client.post("/v1/completions", json=body | {"max_tokens": 200, "ignore_eos": True}, timeout=0.05)
                outcomes["timeout-disconnect finished"] += 1
            except httpx.TimeoutException:
                outcomes["timeout-disconnect left"] += 1
        elif kind == "bad":
            r = await client.post(
                "/v1/completions",
                content=rng.choice(
                    [b"{", b'{"prompt": 3}', b'{"prompt": "x", "n": 99}', b'{"prompt": [-4]}', b"\xff\xfe"]
                ),
                headers={"content-type": "application/json"},
            )
            outcomes[f"bad {r.status_code}"] += 1
        else:
            r = await client.post("/v1/completions", json=body | ({"n": 3} if kind == "n" else {}))
            outcomes[f"{kind} {r.status_code}"] += 1
    except httpx.HTTPError as e:
        outcomes[f"{kind} {type(e).__name__}"] += 1


async def _aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


async def _drive(base: str, seconds: float, *also) -> Counter:
    """Mixed requests from CONCURRENCY clients for `seconds`, with the coroutines `also` running beside them."""
    outcomes: Counter = Counter()
    rng = random.Random(0)
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CONCURRENCY * 2)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker():
            while time.monotonic() < deadline:
                await _one(client, rng, outcomes)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)), *also)
    return outcomes


def test_soak_mixed_requests_leak_nothing(tmp_path):
    before = set(leftover_segments())
    proc, base = start_server(
        tmp_path, "--kv-cache-tokens", "16384", "--context-len", "512", "--max-bs", "32", "--workers", "2"
    )
    try:
        asyncio.run(_drive(base, min(20.0, SECONDS / 6)))  # warm-up: caches, allocator pools, JIT paths
        pids = process_tree(proc.pid)
        rss_start = rss_mb(pids)
        outcomes = asyncio.run(_drive(base, SECONDS))
        rss_end = rss_mb(pids)
        total = sum(outcomes.values())
        print(
            f"\nsoak: {total} requests in {SECONDS:.0f} s; RSS {rss_start:.0f} -> {rss_end:.0f} MB over "
            f"{len(pids)} processes; outcomes {dict(sorted(outcomes.items()))}"
        )
        assert total >= 1000
        assert not [k for k in outcomes if k.split()[-1].startswith("5")], outcomes  # no 5xx at all
        assert wait_for_metric(base, "ringllm_kv_cache_slots_used_by_requests", 0, 30) == 0
        assert metric(base, "ringllm_num_requests_running") == 0
        assert metric(base, "ringllm_num_requests_waiting") == 0
        assert rss_end - rss_start < RSS_GROWTH_LIMIT_MB
        assert httpx.get(base + "/health").status_code == 200
    finally:
        stop_server(proc)
    time.sleep(1)
    assert not (set(leftover_segments()) - before)


SILENT_CONNECTIONS = 300


async def _hold_silent_connections(port: int, deadline: float) -> None:
    """Keeps about SILENT_CONNECTIONS TCP connections open that send nothing (the server closes each after its
    header-read timeout; closed ones are replaced)."""
    held: list[socket.socket] = []
    while time.monotonic() < deadline:
        held = [s for s in held if not _closed_by_peer(s)]
        while len(held) < SILENT_CONNECTIONS:
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            held.append(s)
        await asyncio.sleep(0.5)
    for s in held:
        s.close()


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        closed = s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        closed = True
    if closed:
        s.close()
    return closed


async def _abuse_profiler(base: str, deadline: float, outcomes: Counter) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while time.monotonic() < deadline:
            r = await client.post("/start_profile")
            outcomes[f"profile {r.status_code}"] += 1
            await asyncio.sleep(4)


def test_soak_with_idle_connections_and_profiler_abuse_keeps_health_fast(tmp_path):
    before = set(leftover_segments())
    proc, base = start_server(
        tmp_path,
        "--kv-cache-tokens",
        "16384",
        "--context-len",
        "512",
        "--max-bs",
        "32",
        "--workers",
        "2",
        "--profiler-dir",
        str(tmp_path / "profiles"),
        "--profiler-max-seconds",
        "2",
    )
    try:
        port = int(base.rsplit(":", 1)[1])
        deadline = time.monotonic() + SECONDS
        latencies: list[float] = []
        codes: Counter = Counter()
        profiles: Counter = Counter()
        outcomes = asyncio.run(
            _drive(
                base,
                SECONDS,
                _hold_silent_connections(port, deadline),
                _abuse_profiler(base, deadline, profiles),
                probe_health(base, deadline, latencies, codes),
            )
        )
        print(
            f"\nabuse soak: {sum(outcomes.values())} requests in {SECONDS:.0f} s beside {SILENT_CONNECTIONS} silent "
            f"connections and {sum(profiles.values())} profiler starts {dict(profiles)}; /health {dict(codes)}, "
            f"slowest {max(latencies):.3f} s, p50 {sorted(latencies)[len(latencies) // 2]:.3f} s"
        )
        assert codes == Counter({200: len(latencies)}) and len(latencies) >= SECONDS
        assert max(latencies) < 1.0
        assert not [k for k in outcomes if k.split()[-1].startswith("5")], outcomes
        assert wait_for_metric(base, "ringllm_kv_cache_slots_used_by_requests", 0, 30) == 0
    finally:
        stop_server(proc)
    time.sleep(1)
    assert not (set(leftover_segments()) - before)
