"""Soak of issue 28's attacks beside normal traffic, bounded in time: clients that never read their streams,
megabyte /tokenize bodies, long stop strings, a grammar whose compile runs past its bound, Host headers of another
site, JSON nested past the parser's bound, the profiler started again and again. Throughout, /health answers
within a second, the normal streams' gaps between tokens stay under RINGLLM_SOAK_MAX_GAP (see MAX_GAP), no answer
is a 500; afterwards no request holds a KV slot and the engine's and the API workers' memory
has not grown past a bound.

Marked `soak`: `scripts/soak.sh` runs it (RINGLLM_SOAK_SECONDS, default 180), ordinary test runs skip it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections import Counter

import httpx
import pytest

from tests.helpers import probe_health, process_tree, rss_mb, serving, wait_for_metric

pytestmark = pytest.mark.soak

SECONDS = float(os.environ.get("RINGLLM_SOAK_SECONDS", "180"))
# The bound on the gaps is 1 s on a GPU. Here the demo model runs on the CPU, whose cores a grammar compile
# (a child process, for its whole 10 s bound) and the attackers' bodies share with the engine: 2.6 s was seen on a
# busy 2-core machine. The attacks this soak replays made gaps of 41.8 s before issue 28's bounds.
MAX_GAP = float(os.environ.get("RINGLLM_SOAK_MAX_GAP", "5.0"))
RSS_GROWTH_LIMIT_MB = 200
SLOW_READERS = 4
ARGS = ("--kv-cache-tokens", "16384", "--context-len", "512", "--max-bs", "32", "--workers", "2")


async def _normal_streams(client: httpx.AsyncClient, deadline: float, gaps: list[float], codes: Counter) -> None:
    """A client as the server is for: streamed completions, one after another, each gap between tokens kept."""
    body = {"prompt": "The sea is", "max_tokens": 32, "ignore_eos": True, "stream": True}
    while time.monotonic() < deadline:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            last = None
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
        codes[r.status_code] += 1


async def _slow_readers(port: int, deadline: float) -> None:
    """SLOW_READERS streams whose clients never read a byte (a small receive window: the server's writes stall
    until --send-timeout cuts them); each one cut is replaced."""
    body = b'{"prompt": "hold", "max_tokens": 400, "ignore_eos": true, "stream": true}'
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    held: list[socket.socket] = []
    while time.monotonic() < deadline:
        held = [s for s in held if not _closed(s)]
        while len(held) < SLOW_READERS:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            s.sendall(request)
            s.setblocking(False)
            held.append(s)
        await asyncio.sleep(1)
    for s in held:
        s.close()


def _closed(s: socket.socket) -> bool:
    """Whether the server closed it; peeks without reading the stream (a slow reader reads nothing)."""
    try:
        closed = s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        closed = True
    if closed:
        s.close()
    return closed


def _attacks() -> list[tuple[str, str, dict, dict]]:
    """(name, path, JSON body, headers) of each attack sent again and again."""
    long_stops = ["a" * 1999 + "b", *(f"{i}" * 4000 for i in range(9))]
    deep = "[" * 100_000 + "]" * 100_000  # JSON nested past any parser's recursion: once a 500
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": deep}}
    called = {"role": "assistant", "content": None, "tool_calls": [call]}
    return [
        ("tokenize 2 MB", "/tokenize", {"prompt": "word, and more " * 140_000}, {}),
        ("detokenize 100k ids", "/detokenize", {"tokens": [7] * 100_000}, {}),
        ("long stops", "/v1/completions", {"prompt": "aaaa", "max_tokens": 64, "stop": long_stops}, {}),
        (
            "slow grammar",
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 8,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "^(a|b|c){14000}$"}},
                },
            },
            {},
        ),
        ("rebinding", "/v1/completions", {"prompt": "x", "max_tokens": 1}, {"host": "attacker.example"}),
        ("deep tool call", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, called]}, {}),
        ("profiler", "/start_profile", {}, {}),
    ]


async def _attack(client: httpx.AsyncClient, attack: tuple, deadline: float, outcomes: Counter) -> None:
    """One attack sent again and again, a second after each answer, for as long as the soak runs (each attack in
    its own loop: a grammar compile that takes its whole bound holds up no other)."""
    name, path, body, headers = attack
    while time.monotonic() < deadline:
        try:
            r = await client.post(path, json=body, headers=headers, timeout=60)
            outcomes[f"{name} {r.status_code}"] += 1
        except httpx.HTTPError as e:
            outcomes[f"{name} {type(e).__name__}"] += 1
        await asyncio.sleep(1)


async def _soak(base: str, seconds: float) -> tuple[list[float], list[float], Counter, Counter, Counter]:
    deadline = time.monotonic() + seconds
    gaps: list[float] = []
    latencies: list[float] = []
    streams, health, attacks = Counter(), Counter(), Counter()
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await asyncio.gather(
            *(_normal_streams(client, deadline, gaps, streams) for _ in range(4)),
            _slow_readers(int(base.rsplit(":", 1)[1]), deadline),
            *(_attack(client, attack, deadline, attacks) for attack in _attacks()),
            probe_health(base, deadline, latencies, health),
        )
    return gaps, latencies, streams, health, attacks


def test_abuse_beside_normal_traffic_keeps_health_fast_gaps_short_and_memory_flat(tmp_path):
    profiles = str(tmp_path / "profiles")
    args = (*ARGS, "--send-timeout", "2", "--profiler-dir", profiles, "--profiler-max-seconds", "2")
    with serving(tmp_path, *args) as (proc, base):
        asyncio.run(_soak(base, min(30.0, SECONDS / 6)))  # warm-up: caches, allocator pools, one of each attack
        pids = process_tree(proc.pid)[1:]  # the engine and the API workers
        each_start = [rss_mb([p]) for p in pids]
        gaps, latencies, streams, health, attacks = asyncio.run(_soak(base, SECONDS))
        each_end = [rss_mb([p]) for p in pids]
        rss_start, rss_end = sum(each_start), sum(each_end)
        print(
            f"\nabuse soak, {SECONDS:.0f} s: {sum(streams.values())} normal streams {dict(streams)}, longest gap "
            f"{max(gaps):.3f} s; /health {dict(health)}, slowest {max(latencies):.3f} s; attacks "
            f"{dict(sorted(attacks.items()))}; RSS {rss_start:.0f} -> {rss_end:.0f} MB, "
            f"by process {[round(a) for a in each_start]} -> {[round(b) for b in each_end]}"
        )
        assert health == Counter({200: len(latencies)}) and max(latencies) < 1.0
        assert streams == Counter({200: sum(streams.values())}) and max(gaps) < MAX_GAP
        assert not [k for k in attacks if k.endswith(" 500")], attacks
        assert attacks["tokenize 2 MB 400"] and attacks["rebinding 421"], attacks  # the bounds answered
        assert wait_for_metric(base, "ringllm_kv_cache_slots_used_by_requests", 0, 60) == 0
        assert rss_end - rss_start < RSS_GROWTH_LIMIT_MB
