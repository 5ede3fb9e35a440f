"""Processes of a running server that die: the engine gone while an API worker starts, kill -9 of the serve
process, a SIGKILLed engine or GPU worker mid-stream, an engine stopped (SIGSTOP) and /health, one API
worker's death, and a restart after kill -9 needing no cleanup."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ringllm.ipc.ring import pid_alive
from tests.helpers import (
    api_workers,
    cmdline,
    engine_pid,
    free_port,
    gone,
    metric,
    process_tree,
    server_segments,
    serving,
    start_server,
    stop_server,
    unheld_mp_semaphores,
    wait_for_metric,
)


def test_an_api_worker_whose_engine_is_gone_is_told_so_in_one_line():
    """The engine's segments vanish while an API worker starts (a SIGTERM during start-up: CI caught the
    worker's lifespan dying with a posix_ipc traceback). Opening the replicas says which engine is gone, as
    EngineDown, which the lifespan logs in one line before the worker exits."""
    from ringllm.app.engine_client import EngineDown
    from ringllm.app.replicas import Replicas

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(EngineDown, match=f"pid {gone.pid}.*not running"):
        Replicas([gone.pid], num_workers=1, kv_slots=64, stall_timeout=30.0)


def test_kill_9_of_the_serve_process_alone_ends_engine_gpu_workers_and_api_workers(tmp_path):
    """The children notice their parent's death (PR_SET_PDEATHSIG, and a watch on the parent pid): none is left
    serving as an orphan, and the engine removes its segments on the way out."""
    with serving(
        tmp_path,
        "--kv-cache-tokens",
        "2048",
        "--context-len",
        "256",
        "--workers",
        "2",
        "--tp-size",
        "2",
        "--nccl-port",
        str(free_port()),
    ) as (proc, _):
        engine = engine_pid(proc)
        everyone = set(process_tree(proc.pid)) - {proc.pid}
        assert len(everyone) >= 4  # engine, rank 1, two API workers (and the resource tracker)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        assert gone(lambda: [p for p in everyone if pid_alive(p)], 60), [
            (p, cmdline(p)[:80]) for p in everyone if pid_alive(p)
        ]
        assert gone(lambda: server_segments(engine), 60)


# ---- liveness ----
def test_health_turns_503_while_the_engine_is_stopped_and_metrics_answer_from_its_heartbeat(tmp_path):
    """SIGSTOP on the engine: /health answers 503 once --engine-stall-timeout passes, /metrics answers at once
    with the values the engine last published; SIGCONT: /health is 200 again."""
    with serving(tmp_path, "--kv-cache-tokens", "2048", "--context-len", "256", "--engine-stall-timeout", "2") as (
        proc,
        base,
    ):
        engine = engine_pid(proc)
        assert (
            httpx.post(
                base + "/v1/completions", json={"prompt": "count", "max_tokens": 7, "ignore_eos": True}, timeout=120
            ).status_code
            == 200
        )
        tokens = metric(base, "ringllm_generation_tokens_total")
        assert tokens >= 7
        time.sleep(0.5)  # past a heartbeat publish
        os.kill(engine, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 60
            while (r := httpx.get(base + "/health", timeout=60)).status_code == 200:
                assert time.monotonic() < deadline, "/health stayed 200 with the engine stopped"
                time.sleep(0.1)
            assert r.status_code == 503 and "no progress" in r.json()["error"]["message"]
            t0 = time.monotonic()
            assert metric(base, "ringllm_generation_tokens_total") == tokens
            assert time.monotonic() - t0 < 5  # not the 10 s a stats round trip used to wait
        finally:
            os.kill(engine, signal.SIGCONT)
        deadline = time.monotonic() + 60
        while httpx.get(base + "/health", timeout=60).status_code != 200:
            assert time.monotonic() < deadline, "/health did not recover after SIGCONT"
            time.sleep(0.1)


KEY = "k3y"
AUTH = {"authorization": f"Bearer {KEY}"}


def _post(base, path, timeout=900, headers=None, **kw):
    return httpx.post(base + path, headers={**AUTH, **(headers or {})}, timeout=timeout, **kw)


def _wait_for_health_not_200(base: str, seconds: float = 60) -> None:
    """503, or no answer once the server has gone on to shut down."""
    deadline = time.monotonic() + seconds
    while _health(base) == 200:
        assert time.monotonic() < deadline, f"/health stayed 200 for {seconds} s"
        time.sleep(0.02)


@pytest.mark.parametrize("victim", ["engine", "worker"])
def test_a_killed_engine_or_worker_brings_the_server_down_cleanly(tmp_path, victim):
    """SIGKILL the engine process, or rank 1 of `ringllm serve --tp-size 2` on CPU, mid-stream: /health turns
    503, the stream ends with an error event, the server exits non-zero, and no process or segment is left."""
    tp = ["--tp-size", "2", "--nccl-port", str(free_port())] if victim == "worker" else []
    with serving(tmp_path, "--kv-cache-tokens", "4096", "--context-len", "512", *tp) as (proc, base):
        engine = engine_pid(proc)
        everyone = process_tree(proc.pid)
        target = (
            engine
            if victim == "engine"
            else next(p for p in process_tree(engine) if p != engine and b"spawn_main" in cmdline(p))
        )
        events, killed = [], False
        with httpx.stream(
            "POST",
            base + "/v1/completions",
            timeout=600,
            json={"prompt": "x", "max_tokens": 500, "ignore_eos": True, "stream": True},
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                if len(events) == 3 and not killed:
                    killed = True
                    os.kill(target, signal.SIGKILL)
                    _wait_for_health_not_200(base)
        assert killed and any('"error"' in e for e in events)  # the stream ended with an error event
        assert proc.wait(120) != 0
        assert gone(lambda: server_segments(engine), 30)
        assert gone(lambda: [p for p in everyone if pid_alive(p)], 30)


def _health(base: str) -> int:
    try:
        return httpx.get(base + "/health", timeout=30).status_code
    except httpx.HTTPError:
        return 0  # already shutting down


def test_restart_after_kill_9_needs_no_cleanup(tmp_path):
    """kill -9 of the whole group (server, API workers, engine, resource tracker: nobody cleans up) leaves the
    engine's segments and no multiprocessing semaphore (sem.mp-*); a new server removes the dead one's.
    Also: the API key from the environment ($RINGLLM_API_KEY) guards the second server."""
    mp_before = unheld_mp_semaphores()
    with serving(tmp_path, "--kv-cache-tokens", "1024", "--context-len", "64") as (proc, base):
        stale = server_segments(engine_pid(proc))
        assert stale
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    # (an engine starting in a parallel test process at this moment would sweep them first: a window of ms)
    assert stale <= set(os.listdir("/dev/shm"))
    assert not unheld_mp_semaphores() - mp_before  # the engine makes none (no multiprocessing queue or lock)
    with serving(tmp_path, "--kv-cache-tokens", "1024", "--context-len", "64", env={"RINGLLM_API_KEY": KEY}) as (
        proc,
        base,
    ):
        assert not stale & set(os.listdir("/dev/shm"))  # the new engine removed the dead one's rings
        body = {"prompt": "again", "max_tokens": 3}
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 401
        assert _post(base, "/v1/completions", json=body, timeout=60).status_code == 200
        stop_server(proc)


RUNNING = "ringllm_num_requests_running"


def _complete(base, timeout=60, **body):
    return httpx.post(base + "/v1/completions", json=body, timeout=timeout)


# ---- issue 12.3 ----
def _sockets(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _tcp(port: int, state: str) -> set[str]:
    """Inodes of the loopback TCP sockets with local port `port` in `state` (01 established, 0A listening)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == state:
                    found.add(cols[9])
    return found


def test_one_api_workers_death_leaves_the_others_serving(tmp_path):
    """SIGKILL of one of two API workers while streams run on both: the other worker's streams finish with
    [DONE], the engine aborts the dead worker's requests, a new worker takes its ring pair over and serves."""
    proc, base = start_server(tmp_path, "--workers", "2", "--kv-cache-tokens", "16384", "--context-len", "512")
    port = int(base.rsplit(":", 1)[1])
    streams, results, started = [], [], threading.Semaphore(0)

    def stream():
        body = {"prompt": "stream", "max_tokens": 200, "ignore_eos": True, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line and not lines:
                        started.release()
                    lines += [line] if line else []
            results.append("done" if lines and lines[-1] == "data: [DONE]" else "cut: " + lines[-1][:200])
        except httpx.HTTPError as e:
            started.release()
            results.append(f"error: {type(e).__name__}")

    try:
        workers = api_workers(proc.pid)
        assert len(workers) == 2, workers
        established = _tcp(port, "01")
        per_worker = [0, 0]
        while min(per_worker) == 0 and len(streams) < 40:  # until each worker runs some of them
            for _ in range(4):
                streams.append(threading.Thread(target=stream))
                streams[-1].start()
                started.acquire(timeout=300)
            established = _tcp(port, "01")
            per_worker = [len(_sockets(w) & established) for w in workers]
        assert min(per_worker) > 0, per_worker
        victim, survivor = workers
        os.kill(victim, signal.SIGKILL)
        for t in streams:
            t.join(300)
        done = results.count("done")
        assert done >= per_worker[1] and all(r == "done" or r.startswith("error") for r in results), results
        assert proc.poll() is None  # the server is still up
        assert wait_for_metric(base, RUNNING, 0, 120) == 0  # the dead worker's requests were aborted
        for _ in range(100):  # Granian starts a new worker in the dead one's place
            new = [w for w in api_workers(proc.pid) if w not in workers]
            if new:
                break
            time.sleep(0.2)
        assert new, "no worker was started in place of the dead one"
        log = (tmp_path / "serve.log").read_text()
        for _ in range(100):
            if log.count('"app worker ready"') == 3:
                break
            time.sleep(0.2)
            log = (tmp_path / "serve.log").read_text()
        assert log.count('"app worker ready"') == 3, log[-3000:]  # it claimed the dead worker's pair
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: _complete(base, prompt=f"after {i}", max_tokens=4).status_code, range(24)))
        assert codes == [200] * 24
        assert survivor in api_workers(proc.pid)
    finally:
        stop_server(proc)
