"""Stopping `ringllm serve` (demo model, loopback): SIGTERM during start-up, Ctrl-C, SIGTERM with requests in
flight (drained, exit 0), --shutdown-timeout bounding the drain; no process and no segment left behind."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from ringllm.ipc.lifecycle import leftover_segments
from ringllm.ipc.ring import pid_alive
from tests.helpers import (
    cmdline,
    engine_pid,
    free_port,
    gone,
    kill_group,
    process_tree,
    server_segments,
    serving,
    start_server,
    stop_server,
    tokens_per_second,
    unheld_mp_semaphores,
)


# ---- signals and orphans ----
def _serve_cmd(port: int, *args) -> list[str]:
    return [
        sys.executable,
        "-m",
        "ringllm",
        "serve",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--kv-cache-tokens",
        "2048",
        "--context-len",
        "256",
        *args,
    ]


def _watch_tree(proc, until) -> set[int]:
    """Every pid seen in the server's process tree until `until()` is true (children come and go)."""
    seen = set()
    while not until():
        seen.update(process_tree(proc.pid))
        time.sleep(0.05)
    seen.update(process_tree(proc.pid))  # what `until` saw appear
    return seen - {proc.pid}


def _engine_spawned(proc) -> bool:
    return any(
        b"spawn_main" in cmdline(p) and b"resource_tracker" not in cmdline(p)
        for p in process_tree(proc.pid)
        if p != proc.pid
    )


@pytest.mark.parametrize("when", ["engine-spawned", "3s"])
def test_sigterm_during_start_up_leaves_no_process_and_no_segment(tmp_path, when):
    """SIGTERM to `ringllm serve` while it starts (as soon as the engine process exists, or 3 s in): it exits 0,
    and no process it started and no segment of theirs is left."""
    mp_before = unheld_mp_semaphores()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        _serve_cmd(free_port()),
        env=dict(os.environ, RINGLLM_CACHE=str(tmp_path)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        t0 = time.monotonic()
        if when == "3s":
            seen = _watch_tree(proc, lambda: time.monotonic() - t0 > 3 or proc.poll() is not None)
        else:
            seen = _watch_tree(proc, lambda: _engine_spawned(proc) or time.monotonic() - t0 > 120)
        os.kill(proc.pid, signal.SIGTERM)  # the serve process alone, as `kill PID` does
        assert proc.wait(120) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert seen, "the serve process had started no child yet"
        assert gone(lambda: [p for p in seen if pid_alive(p)], 60)
        assert gone(lambda: [s for p in seen for s in leftover_segments(p)], 60)
        assert not unheld_mp_semaphores() - mp_before
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        kill_group(proc)


def _stream_in_background(base: str, tokens: int):
    events, started = [], threading.Event()

    def run():
        body = {"prompt": "ctrl-c", "max_tokens": tokens, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        started.set()
        except httpx.HTTPError:
            events.append("cut")
        started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(120)
    return thread, events


@pytest.mark.parametrize("to", ["server", "group"])
def test_ctrl_c_drains_like_sigterm_and_exits_0_without_a_traceback(tmp_path, to):
    """SIGINT to the serve process drains as SIGTERM does (the stream in flight finishes); SIGINT to the whole
    process group, as a terminal's Ctrl-C sends it, also ends with exit 0 and no traceback from any process."""
    # The group's API workers stop at once, so the engine's drain then has nobody to stream to: bound it short.
    shutdown = "300" if to == "server" else "3"
    with serving(tmp_path, "--kv-cache-tokens", "4096", "--context-len", "2048", "--shutdown-timeout", shutdown) as (
        proc,
        base,
    ):
        # About 6 s of decoding at the rate measured now, at most 400 tokens: the rate is measured on a short
        # context, and on a CPU later tokens are slower (2,000 tokens once took 261 s on a loaded 2-core box).
        thread, events = _stream_in_background(base, max(64, min(400, int(tokens_per_second(base) * 6))))
        if to == "server":
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(300) == 0
        thread.join(60)
        log = (tmp_path / "serve.log").read_text()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
        if to == "server":
            assert events[-1] == "data: [DONE]", events[-3:]


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
        assert gone(lambda: server_segments(engine), 30)
        assert not pid_alive(engine)


def _wait_for_health(base: str, status: int, seconds: float = 60) -> None:
    """Polls /health until it answers `status`; the bound is for a stuck server only."""
    deadline = time.monotonic() + seconds
    while _health(base) != status:
        assert time.monotonic() < deadline, f"/health did not turn {status} within {seconds} s"
        time.sleep(0.02)


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
        assert gone(lambda: server_segments(engine), 30)


def _health(base: str) -> int:
    try:
        return httpx.get(base + "/health", timeout=30).status_code
    except httpx.HTTPError:
        return 0  # already shutting down


def test_segments_removed_after_shutdown(tmp_path):
    proc, _ = start_server(tmp_path, "--kv-cache-tokens", "1024", "--context-len", "64")
    engine = engine_pid(proc)  # this server's own (a parallel test process may be running servers of its own)
    engine_segments = server_segments(engine)
    assert any("req0" in s for s in engine_segments)
    stop_server(proc)
    assert proc.returncode == 0
    time.sleep(1)
    assert not engine_segments & set(leftover_segments())
