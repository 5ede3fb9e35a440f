"""--dp-size 2 on CPU (two engine processes behind the same API workers): serving, prefix-affinity routing,
/metrics summed over the replicas, a SIGKILLed replica, and a SIGTERM that drains both. One server for most
tests (the last one stops it), one more for the replica kill."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from ringllm.ipc.lifecycle import leftover_segments
from ringllm.ipc.ring import pid_alive
from tests.helpers import engine_pids, per_replica, process_tree, scrape, serving, wait_both_running

SHARED = [(7 * i) % 1000 + 3 for i in range(96)]  # a 96-token prefix (6 router blocks) several prompts share


# ---- one server, --dp-size 2 ----
@pytest.fixture(scope="module")
def dp_server(tmp_path_factory):
    # A long drain bound: the drain test's streams must finish on a busy 2-core machine, not be cut.
    args = ("--dp-size", "2", "--workers", "2", "--shutdown-timeout", "600")
    with serving(tmp_path_factory.mktemp("dp"), *args) as (proc, base):
        yield proc, base


def series(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def complete(base: str, prompt, max_tokens: int = 2) -> dict:
    r = httpx.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_dp2_serves_completions_and_chat(dp_server):
    _, base = dp_server
    health = httpx.get(base + "/health", timeout=30)
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["replicas_serving"] == 2
    assert complete(base, "Hello there", 6)["choices"][0]["finish_reason"] == "length"
    chat = httpx.post(
        base + "/v1/chat/completions",
        timeout=120,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert chat.json()["usage"]["completion_tokens"] == 5
    assert series(scrape(base), "ringllm_dp_replicas") == 2


def test_a_shared_prefix_stays_on_one_replica(dp_server):
    """Requests sharing a long prefix go to one replica (through either API worker: an idle server breaks
    the tie by the prompt's start), whose prefix cache then serves the shared part."""
    _, base = dp_server
    before = scrape(base)
    for k in range(4):
        complete(base, SHARED + [500 + k] * 8)
    after = scrape(base)
    hits = {
        r: v - per_replica(before, "ringllm_dp_replica_prefix_cache_hit_tokens")[r]
        for r, v in per_replica(after, "ringllm_dp_replica_prefix_cache_hit_tokens").items()
    }
    queries = {
        r: v - per_replica(before, "ringllm_dp_replica_prefix_cache_query_tokens")[r]
        for r, v in per_replica(after, "ringllm_dp_replica_prefix_cache_query_tokens").items()
    }
    holder = max(queries, key=queries.get)
    assert queries[1 - holder] == 0, queries  # every request went to one replica
    assert hits[holder] >= 3 * len(SHARED), hits  # and the three after the first found the prefix cached


def test_distinct_prefixes_spread_over_both_replicas(dp_server):
    _, base = dp_server
    before = per_replica(scrape(base), "ringllm_dp_replica_prefix_cache_query_tokens")
    for k in range(8):
        complete(base, [k * 37 % 1000 + 1 + j for j in range(40)])
    after = per_replica(scrape(base), "ringllm_dp_replica_prefix_cache_query_tokens")
    assert all(after[r] > before[r] for r in (0, 1)), (before, after)


def test_metrics_sum_both_replicas(dp_server):
    _, base = dp_server
    complete(base, "sum me", 3)
    text = scrape(base)
    pairs = (
        ("ringllm_prefix_cache_queries_total", "ringllm_dp_replica_prefix_cache_query_tokens"),
        ("ringllm_prefix_cache_hits_total", "ringllm_dp_replica_prefix_cache_hit_tokens"),
        ("ringllm_generation_tokens_total", "ringllm_dp_replica_generation_tokens"),
    )
    for total, each in pairs:
        values = per_replica(text, each)
        assert len(values) == 2 and all(v > 0 for v in values.values()), (each, values)
        assert series(text, total) == sum(values.values()), total
    rate = series(text, "ringllm_prefix_cache_hit_rate")
    assert rate == pytest.approx(
        series(text, "ringllm_prefix_cache_hits_total") / series(text, "ringllm_prefix_cache_queries_total")
    )


class Streams:
    """Streamed completions on threads; each records its last data line. `stop` makes them hang up."""

    def __init__(self, base: str, count: int, max_tokens: int):
        self.base, self.max_tokens = base, max_tokens
        self.last: dict[int, str | None] = {}
        self.started = [threading.Event() for _ in range(count)]  # set at each stream's first data line
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(count)]
        for t in self.threads:
            t.start()

    def _run(self, k: int) -> None:
        body = {
            "prompt": [k * 91 % 1000 + 2 + j for j in range(20)],
            "max_tokens": self.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        last = None
        try:
            with httpx.stream("POST", self.base + "/v1/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        last = line
                        self.started[k].set()
                    if self.stop.is_set():
                        break
        finally:
            self.last[k] = last

    def join(self) -> None:
        for t in self.threads:
            t.join(900)


def _named(comm: str) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == comm:
                out.add(int(entry))
        except OSError:
            continue
    return out


def _answers(base: str) -> bool:
    try:
        return httpx.get(base + "/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def exit_status(proc: subprocess.Popen, tree: list[int], seconds: float) -> int:
    """The server's exit status; if it does not exit in time, which of its processes are left, and where."""
    try:
        return proc.wait(seconds)
    except subprocess.TimeoutExpired:
        left = {
            p: (Path(f"/proc/{p}/comm").read_text().strip(), Path(f"/proc/{p}/wchan").read_text())
            for p in tree
            if pid_alive(p)
        }
        raise AssertionError(f"the server did not exit in {seconds} s; left: {left}") from None


def assert_all_gone(pids: list[int], engines: list[int]) -> None:
    """No process of the server's tree and no segment of its replicas is left. multiprocessing's resource
    tracker exits once it reads the end of its pipe, just after the server: a bounded count of looks."""
    for _ in range(400):
        left = [p for p in pids if pid_alive(p)]
        if not left:
            break
        time.sleep(0.05)
    assert not left, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left if pid_alive(p)]
    assert not [s for e in engines for s in leftover_segments(e)], "segments left in /dev/shm"


def test_sigterm_drains_every_replica(dp_server):
    """Last of the module: SIGTERM to the server lets the streams on both replicas finish, then it exits 0
    leaving no process and no segment."""
    proc, base = dp_server
    engines = engine_pids(proc.pid, 2)
    # Long enough that a scrape sees them running on both replicas on a fast machine, short enough to drain.
    streams = Streams(base, 4, max_tokens=200)
    wait_both_running(base)
    # Every stream in flight before the signal: one not yet admitted is (rightly) refused by the drain.
    assert all(started.wait(120) for started in streams.started)
    tree = process_tree(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    streams.join()
    assert exit_status(proc, tree, 600) == 0
    assert all(last == "data: [DONE]" for last in streams.last.values()), streams.last
    assert_all_gone(tree, engines)


# ---- a replica that dies ----
def test_a_killed_replica_fails_its_requests_and_the_others_serve_on(tmp_path):
    with serving(tmp_path, "--dp-size", "2", "--workers", "1") as (proc, base):
        engines = engine_pids(proc.pid, 2)
        streams = Streams(base, 4, max_tokens=2000)
        try:
            wait_both_running(base)
            os.kill(engines[1], signal.SIGKILL)
            for _ in range(600):  # its two streams end with an error event
                failed = [v for v in streams.last.values() if v and '"error"' in v]
                if len(failed) == 2:
                    break
                time.sleep(0.05)
            assert len(failed) == 2 and all("engine replica 1" in v for v in failed), streams.last
            assert len(streams.last) == 2  # the streams on replica 0 go on
            health = httpx.get(base + "/health", timeout=30)
            assert health.status_code == 200, health.text
            body = health.json()
            assert body["status"] == "degraded" and body["replicas_serving"] == 1
            assert [r["serving"] for r in body["replicas"]] == [True, False]
            for k in range(4):  # new requests, whatever prefix, go to the replica that serves
                complete(base, [k * 53 % 1000 + 7 + j for j in range(40)])
            assert series(scrape(base), "ringllm_dp_replicas_serving") == 1
        finally:
            streams.stop.set()
            streams.join()
        # An API worker that dies now is respawned, and its successor serves with the replica that is left
        # (the dead one's segments are gone from its view: it is counted as not serving, not a start-up error).
        api = [p for p in process_tree(proc.pid) if p in _named("ringllm-api")]
        assert len(api) == 1
        os.kill(api[0], signal.SIGKILL)
        for _ in range(600):  # Granian respawns it after 3.5 s
            time.sleep(0.1)
            new = [p for p in process_tree(proc.pid) if p != api[0] and p in _named("ringllm-api")]
            if new and _answers(base):
                break
        health = httpx.get(base + "/health", timeout=30)
        assert health.status_code == 200 and health.json()["replicas_serving"] == 1, health.text
        complete(base, "after the respawn")
        tree = process_tree(proc.pid)
        os.kill(proc.pid, signal.SIGTERM)
        assert exit_status(proc, tree, 300) == 1  # the server exits non-zero: one of its replicas died
        assert_all_gone(tree, engines)
        log = (tmp_path / "serve.log").read_text(errors="replace")
        assert f"engine replica 1 (pid {engines[1]}) exited (code -9); 1 of 2 replicas serve on" in log
