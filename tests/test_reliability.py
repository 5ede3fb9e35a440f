"""Reliability on the demo model over loopback: hostile input, overload, timeouts, auth, fuzzing, SIGTERM drain
and restart after kill -9. Every test asserts status codes and that the server is whole afterwards: KV pool
usage back at its baseline, no segments or processes left behind.

On a loaded machine: each test owns what it starts (the server's group is killed at the end whatever happens;
its engine and segments are found from the server's own pid), and waits follow the work (counts, a rate
measured at the start of the test, or generous bounds that only a stuck server reaches), never a speed."""

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ringllm.ipc.ring import pid_alive
from tests.helpers import (
    engine_pid,
    free_port,
    metric,
    process_tree,
    server_segments,
    serving,
    start_server,
    stop_server,
    tokens_per_second,
    wait_for_metric,
)

KEY = "k3y"
AUTH = {"authorization": f"Bearer {KEY}"}
SLOTS = "ringllm_kv_cache_slots_used_by_requests"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Small queue and batch (overload is easy to reach), an API key with /health public and /metrics guarded.
    Its request timeout only bounds a stuck request: a short one on a busy machine must not hit it."""
    cache = tmp_path_factory.mktemp("reliability")
    proc, base = start_server(
        cache,
        "--kv-cache-tokens",
        "8192",
        "--context-len",
        "2048",
        "--max-bs",
        "2",
        "--max-waiting-requests",
        "2",
        "--request-timeout",
        "600",
        "--api-key",
        KEY,
        "--public-routes",
        "/health",
    )
    yield base
    stop_server(proc)


def _post(base, path, timeout=900, headers=None, **kw):
    return httpx.post(base + path, headers={**AUTH, **(headers or {})}, timeout=timeout, **kw)


def _assert_serves(base):
    r = _post(base, "/v1/completions", json={"prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


HOSTILE = [
    ("/v1/completions", b"{", 400),
    ("/v1/completions", b"[]", 400),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("/v1/completions", b'{"prompt": 5}', 400),
    ("/v1/completions", b'{"prompt": [[1, 2], "x"]}', 400),
    ("/v1/completions", b'{"prompt": [1e400]}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -5}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 99999999999999999999999}', 400),
    ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', 400),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', 400),
    ("/v1/completions", b'{"prompt": "x", "n": 1000}', 400),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 99}', 400),
    ("/v1/completions", b'{"prompt": [1, 2, 1000000000]}', 400),
    ("/v1/completions", b'{"prompt": [-1]}', 400),
    (
        "/v1/completions",
        b'{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}',
        400,
    ),
    ("/v1/completions", b'{"prompt": "x", "stop": [""]}', 400),
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [' + b",".join([b"1"] * 100) + b"]}", 400),
    ("/v1/completions", b'{"prompt": "x", "seed": 99999999999999999999}', 400),
    ("/v1/completions", b'{"prompt": "' + b"word " * 3000 + b'"}', 400),  # over the context
    ("/v1/chat/completions", b'{"messages": []}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 7}]}', 400),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": true}',
        400,
    ),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}', 400),
    ("/tokenize", b'{"prompt": 3}', 400),
    ("/detokenize", b'{"tokens": [1, -7]}', 400),
    ("/detokenize", b'{"tokens": "abc"}', 400),
]


def test_hostile_bodies_get_clear_errors_and_the_server_keeps_serving(server):
    for path, body, status in HOSTILE:
        r = _post(server, path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, body[:80], r.status_code, r.text[:300])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (body[:80], error)
    too_long = _post(
        server,
        "/v1/completions",
        content=b'{"prompt": "' + b"word " * 3000 + b'"}',
        headers={"content-type": "application/json"},
    ).json()["error"]["message"]
    assert "tokens" in too_long and "2048" in too_long, too_long  # the counts are named
    _assert_serves(server)
    assert wait_for_metric(server, SLOTS, 0, 60, AUTH) == 0


def test_body_over_the_size_limit_is_413(server):
    r = _post(
        server,
        "/v1/completions",
        content=b'{"prompt": "' + b"x" * (9 << 20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["message"]
    _assert_serves(server)


def test_api_key_guards_v1_and_metrics_but_not_health(server):
    assert httpx.post(server + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/metrics").status_code == 401
    assert httpx.post(server + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/v1/models", headers=AUTH).status_code == 200


def test_overload_answers_503_with_retry_after_at_once(server):
    """2 running + 2 waiting fill the engine; the rest are refused at once (before any admitted request ends),
    and pool usage returns to 0. Each request is about 5 s of decoding at this machine's measured rate: long
    enough to hold its slot while the others arrive, short enough to finish on a busy machine."""
    tokens = max(32, min(1500, int(tokens_per_second(server, headers=AUTH) * 5)))
    body = {"prompt": "busy", "max_tokens": tokens, "ignore_eos": True}

    def one(_):
        t = time.monotonic()
        r = _post(server, "/v1/completions", json=body)
        return r.status_code, time.monotonic() - t, r.headers.get("retry-after"), r.json()

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))
    refused = [r for r in results if r[0] == 503]
    admitted = [r for r in results if r[0] != 503]
    assert refused and admitted, [r[0] for r in results]
    assert all(retry == "1" and "queue is full" in body["error"]["message"] for _, _, retry, body in refused)
    assert max(r[1] for r in refused) < min(r[1] for r in admitted)
    assert {r[0] for r in admitted} == {200}
    assert wait_for_metric(server, SLOTS, 0, 60, AUTH) == 0
    assert metric(server, "ringllm_num_requests_waiting", AUTH) == 0
    _assert_serves(server)


def test_request_timeout_aborts_and_frees_slots(tmp_path):
    """--request-timeout 1.5 against requests for 2000 tokens (several seconds even on a fast machine): 504, or an
    error event ending the stream, and the KV slots are freed."""
    with serving(tmp_path, "--kv-cache-tokens", "4096", "--context-len", "2048", "--request-timeout", "1.5") as (
        proc,
        base,
    ):
        body = {"prompt": "long", "max_tokens": 2000, "ignore_eos": True}
        t = time.monotonic()
        r = httpx.post(base + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"  # not 200: it was cut short
        assert time.monotonic() - t > 1.4
        with httpx.stream("POST", base + "/v1/completions", timeout=600, json=body | {"stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"timeout_error"' in events[-1]  # the stream ends with an error event
        assert wait_for_metric(base, SLOTS, 0, 60) == 0
        assert metric(base, "ringllm_generation_tokens_total") > 0
        assert httpx.get(base + "/health", timeout=60).status_code == 200
        stop_server(proc)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fuzz")
    proc, base = start_server(
        cache,
        "--kv-cache-tokens",
        "16384",
        "--context-len",
        "64",
        "--max-bs",
        "64",
        "--profile-dir",
        str(cache / "profiles"),
    )
    yield base
    stop_server(proc)


@pytest.mark.skipif(
    shutil.which("schemathesis", path=os.path.dirname(sys.executable)) is None, reason="schemathesis is not installed"
)
def test_schemathesis_finds_no_server_error(fuzz_server, tmp_path):
    """Schemathesis drives every route of the app's own OpenAPI document with valid and invalid bodies."""
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    cmd = [
        exe,
        "run",
        fuzz_server + "/schema/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "7",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--exclude-path-regex",
        "profile",
        "--generation-database",
        "none",
        "--no-color",
        "--report-dir",
        str(tmp_path),
    ]
    env = dict(
        os.environ,
        SCHEMATHESIS_HOOKS="tests.schemathesis_hooks",
        PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in run.stdout.lower(), run.stdout[-2000:]
    print(run.stdout[-1500:])
    assert httpx.get(fuzz_server + "/health").status_code == 200
    assert wait_for_metric(fuzz_server, SLOTS, 0, 30) == 0


def test_sigterm_drains_requests_in_flight_then_exits_0(tmp_path):
    """The stream's length follows this machine's measured rate (about 6 s of decoding), and the shutdown
    timeout is far above it, so the drain is tested whatever the load."""
    with serving(tmp_path, "--kv-cache-tokens", "4096", "--context-len", "2048", "--shutdown-timeout", "300") as (
        proc,
        base,
    ):
        engine = engine_pid(proc)
        tokens = max(64, min(2000, int(tokens_per_second(base) * 6)))
        events, started = [], threading.Event()

        def stream():
            body = {
                "prompt": "drain",
                "max_tokens": tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        started.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(120)
        os.kill(proc.pid, signal.SIGTERM)  # the main process alone, as `kill PID` or a container stop does
        _wait_for_health(base, 503)  # load balancers stop sending work
        late = httpx.post(base + "/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=60)
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert "shutting down" in late.json()["error"]["message"]
        assert reader.is_alive()  # all of this happened while the stream was still running
        reader.join(600)
        assert events[-1] == "data: [DONE]" and f'"completion_tokens":{tokens}' in events[-2], events[-3:]
        assert proc.wait(120) == 0
        assert _gone(lambda: server_segments(engine))
        assert not pid_alive(engine)


def _wait_for_health(base: str, status: int, seconds: float = 60) -> None:
    """Polls /health until it answers `status`; the bound is for a stuck server only."""
    deadline = time.monotonic() + seconds
    while _health(base) != status:
        assert time.monotonic() < deadline, f"/health did not turn {status} within {seconds} s"
        time.sleep(0.02)


def _wait_for_health_not_200(base: str, seconds: float = 60) -> None:
    """503, or no answer once the server has gone on to shut down."""
    deadline = time.monotonic() + seconds
    while _health(base) == 200:
        assert time.monotonic() < deadline, f"/health stayed 200 for {seconds} s"
        time.sleep(0.02)


def _gone(what, seconds: float = 30) -> bool:
    """Waits until `what()` is empty (segments removed, processes reaped); True if it became so."""
    deadline = time.monotonic() + seconds
    while what() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not what()


def test_kv_pool_running_out_preempts_and_fails_nothing(tmp_path):
    """8 requests that need 8 x 250 slots share a pool of 600: the scheduler preempts and recomputes, and every
    request still gets all its tokens."""
    with serving(
        tmp_path, "--kv-cache-tokens", "600", "--context-len", "256", "--max-bs", "8", "--disable-radix-cache"
    ) as (proc, base):

        def one(i):
            return httpx.post(
                base + "/v1/completions",
                timeout=600,
                json={"prompt": f"request number {i}", "max_tokens": 240, "ignore_eos": True, "temperature": 0},
            )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        assert [r.status_code for r in results] == [200] * 8
        assert all(r.json()["usage"]["completion_tokens"] == 240 for r in results)
        assert metric(base, "ringllm_preemptions_total") > 0
        assert wait_for_metric(base, SLOTS, 0, 60) == 0
        stop_server(proc)


def test_shutdown_timeout_bounds_the_drain(tmp_path):
    """A request longer than --shutdown-timeout does not hold the server up: it stops after about that long,
    exits 0 and leaves nothing behind."""
    with serving(tmp_path, "--kv-cache-tokens", "4096", "--context-len", "2048", "--shutdown-timeout", "1") as (
        proc,
        base,
    ):
        engine = engine_pid(proc)
        started, lines = threading.Event(), []

        def stream():
            body = {"prompt": "endless", "max_tokens": 2040, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
                    for line in r.iter_lines():
                        lines.append(line)
                        started.set()
            except httpx.HTTPError:
                pass  # the server closed the connection at its shutdown timeout

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert started.wait(120)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 0
        reader.join(60)
        assert "data: [DONE]" not in lines  # cut short, not finished, and told so
        assert any("shut down before this request finished" in line for line in lines), lines[-3:]
        assert _gone(lambda: server_segments(engine))


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
            else next(p for p in process_tree(engine) if p != engine and b"spawn_main" in _cmdline(p))
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
        assert _gone(lambda: server_segments(engine))
        assert _gone(lambda: [p for p in everyone if pid_alive(p)])


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _health(base: str) -> int:
    try:
        return httpx.get(base + "/health", timeout=30).status_code
    except httpx.HTTPError:
        return 0  # already shutting down


def test_restart_after_kill_9_needs_no_cleanup(tmp_path):
    """kill -9 of the whole group (server, API workers, engine, resource tracker: nobody cleans up) leaves the
    engine's segments and no multiprocessing semaphore (sem.mp-*); a new server removes the dead one's.
    Also: the API key from the environment ($RINGLLM_API_KEY) guards the second server."""
    mp_before = _mp_semaphores()
    with serving(tmp_path, "--kv-cache-tokens", "1024", "--context-len", "64") as (proc, base):
        stale = server_segments(engine_pid(proc))
        assert stale
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert stale <= set(os.listdir("/dev/shm"))
    assert not _mp_semaphores() - mp_before  # the engine makes none (no multiprocessing queue or lock)
    with serving(tmp_path, "--kv-cache-tokens", "1024", "--context-len", "64", env={"RINGLLM_API_KEY": KEY}) as (
        proc,
        base,
    ):
        assert not stale & set(os.listdir("/dev/shm"))  # the new engine removed the dead one's rings
        body = {"prompt": "again", "max_tokens": 3}
        assert httpx.post(base + "/v1/completions", json=body, timeout=60).status_code == 401
        assert _post(base, "/v1/completions", json=body, timeout=60).status_code == 200
        stop_server(proc)


def _mp_semaphores() -> set[str]:
    return {e for e in os.listdir("/dev/shm") if e.startswith("sem.mp-")}
