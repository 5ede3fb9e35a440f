"""Hardening against hostile clients and careless operators (issue 19, issue 12): segment names and the stale
sweep, signals and orphans, connection limits, the profiler routes, liveness. Servers run the demo model on
loopback; every count and duration is bounded."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import posix_ipc
import pytest

from ringllm.ipc import lifecycle
from ringllm.ipc.lifecycle import leftover_segments, remove_stale_segments
from ringllm.ipc.ring import pid_alive
from tests.helpers import (
    engine_pid,
    free_port,
    kill_group,
    metric,
    process_tree,
    server_segments,
    serving,
    tokens_per_second,
)

ROOT = Path(__file__).resolve().parent.parent


# ---- segment names and the stale sweep ----
def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return run.returncode == 0


OWNER = """
import os, sys, time
sys.path.insert(0, {root!r})
from ringllm.ipc.lifecycle import RingPair
pair = RingPair(os.getpid(), 0, capacity=4096)
print(os.getpid(), pair.requests.name, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not _can_unshare(), reason="no unprivileged pid namespaces here (unshare)")
def test_engines_with_one_pid_in_two_pid_namespaces_do_not_collide_and_are_swept_once_dead():
    """Two owners that are both pid 1 of their own pid namespace, sharing /dev/shm (as two containers with
    --ipc=host): both create their rings; a sweep from outside leaves the live ones alone and removes them once
    their owners are killed."""
    before = set(leftover_segments())
    cmd = [
        "unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--mount-proc",
        sys.executable,
        "-c",
        OWNER.format(root=str(ROOT)),
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(2)
    ]
    try:
        lines = [p.stdout.readline().split() for p in procs]
        assert all(line and line[0] == "1" for line in lines), (lines, [p.stderr.read() for p in procs if p.poll()])
        assert lines[0][1] != lines[1][1]  # same pid, different names
        theirs = set(leftover_segments()) - before
        assert len(theirs) >= 2 * 6  # two ring pairs (segments, semaphores) and two lock files
        assert not theirs & set(remove_stale_segments())  # alive in another namespace: kept
        assert theirs <= set(leftover_segments())
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)  # nobody cleans up
            p.wait(30)
    # unshare can be reaped before its child (pid 1 inside) has finished exiting and let go of its lock file, so
    # the sweep is retried until the owners are truly gone; a live owner's segments would never be removed.
    removed: set[str] = set()
    deadline = time.monotonic() + 30
    while not theirs <= removed and time.monotonic() < deadline:
        removed |= set(remove_stale_segments())
        time.sleep(0.1)
    assert theirs <= removed
    assert not theirs & set(leftover_segments())


def test_a_reused_pid_does_not_inherit_a_dead_owners_segments():
    """A segment named for this pid but another start time belongs to an earlier process with the same pid:
    stale, swept; this process's own segments are kept."""
    me = os.getpid()
    ns = lifecycle._pid_namespace()
    earlier = f"/{lifecycle.PREFIX}-{me}-1-{ns}-req0"
    shm = posix_ipc.SharedMemory(earlier, posix_ipc.O_CREX, size=4096)
    shm.close_fd()
    mine = posix_ipc.SharedMemory(lifecycle.segment_name(me, "h2keep"), posix_ipc.O_CREX, size=4096)
    mine.close_fd()
    try:
        removed = remove_stale_segments()
        assert earlier.lstrip("/") in removed
        assert mine.name.lstrip("/") not in removed and mine.name.lstrip("/") in leftover_segments(me)
    finally:
        mine.unlink()


def test_a_zombie_owners_segments_are_swept():
    """After kill -9 of a whole group the engine's new parent may not have reaped it yet: a zombie has exited
    and closed everything, so a restarting server must sweep its segments (this raced in CI before)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    name = lifecycle.segment_name(child.pid, "h2zombie")
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
        shm.close_fd()
        assert name.lstrip("/") not in remove_stale_segments()  # alive: kept
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(200):  # until the kernel has made it a zombie (not reaped: no wait() yet)
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.05)
        assert name.lstrip("/") in remove_stale_segments()
    finally:
        child.kill()
        child.wait(30)
        if name.lstrip("/") in leftover_segments():
            posix_ipc.unlink_shared_memory(name)


HOLDER = """
import sys, time, posix_ipc
sem = posix_ipc.Semaphore(sys.argv[1], posix_ipc.O_CREX, initial_value=1)
print("ready", flush=True)
time.sleep(120)
"""


def test_sweep_removes_multiprocessing_semaphores_whose_holders_were_killed():
    """sem.mp-* files of processes killed with -9 (resource tracker and all) are removed; one that a live
    process still holds is kept, however old."""
    names = [f"/mp-h2{os.getpid()}{tag}" for tag in ("dead", "live")]
    procs = [
        subprocess.Popen([sys.executable, "-c", HOLDER, name], stdout=subprocess.PIPE, text=True) for name in names
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        procs[0].kill()
        procs[0].wait(10)
        old = time.time() - 2 * lifecycle.MP_SEMAPHORE_MIN_AGE_S
        for name in names:
            os.utime(f"/dev/shm/sem.{name[1:]}", (old, old))
        removed = remove_stale_segments()
        assert f"sem.{names[0][1:]}" in removed
        assert f"sem.{names[1][1:]}" not in removed and os.path.exists(f"/dev/shm/sem.{names[1][1:]}")
    finally:
        procs[1].kill()
        procs[1].wait(10)
        for name in names:
            try:
                posix_ipc.unlink_semaphore(name)
            except posix_ipc.ExistentialError:
                pass


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
        b"spawn_main" in _cmdline(p) and b"resource_tracker" not in _cmdline(p)
        for p in process_tree(proc.pid)
        if p != proc.pid
    )


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _gone(what, seconds: float = 60) -> bool:
    """Waits until `what()` is empty; the bound is for a stuck process only."""
    deadline = time.monotonic() + seconds
    while what() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not what()


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


@pytest.mark.parametrize("when", ["engine-spawned", "3s"])
def test_sigterm_during_start_up_leaves_no_process_and_no_segment(tmp_path, when):
    """SIGTERM to `ringllm serve` while it starts (as soon as the engine process exists, or 3 s in): it exits 0,
    and no process it started and no segment of theirs is left."""
    mp_before = {e for e in os.listdir("/dev/shm") if e.startswith("sem.mp-")}
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
        assert _gone(lambda: [p for p in seen if pid_alive(p)])
        assert _gone(lambda: [s for p in seen for s in leftover_segments(p)])
        assert not {e for e in os.listdir("/dev/shm") if e.startswith("sem.mp-")} - mp_before
        assert "Traceback" not in (tmp_path / "serve.log").read_text()
    finally:
        kill_group(proc)


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
        assert _gone(lambda: [p for p in everyone if pid_alive(p)]), [
            (p, _cmdline(p)[:80]) for p in everyone if pid_alive(p)
        ]
        assert _gone(lambda: server_segments(engine))


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


# ---- connections ----
def _open(port: int, first_bytes: bytes | None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if first_bytes:
        s.sendall(first_bytes)
    return s


PARTIAL_BODY = (
    b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b'Content-Length: 1000\r\n\r\n{"prompt": '
)
HOLDERS = {
    "silent": None,
    "request line": b"GET /heal",
    "headers": b"GET /health HTTP/1.1\r\nHost: localhost\r\n",
    "body": PARTIAL_BODY,
}


def test_silent_and_partial_connections_do_not_lock_anyone_out(tmp_path):
    """200 connections that send nothing, part of a request line, part of their headers or part of their body,
    against a server that serves 16 connections at once: each is closed after the header (or body) read
    timeout, so /health answers (before: never, while they stayed open); a partial body is answered 408."""
    with serving(
        tmp_path,
        "--kv-cache-tokens",
        "2048",
        "--context-len",
        "256",
        "--max-connections",
        "16",
        "--header-read-timeout",
        "1",
        "--body-read-timeout",
        "1",
    ) as (_proc, base):
        port = int(base.rsplit(":", 1)[1])
        held = [(kind, _open(port, data)) for kind, data in HOLDERS.items() for _ in range(50)]
        try:
            r = httpx.get(base + "/health", timeout=120)  # queued behind them; bounded for a stuck server only
            assert r.status_code == 200
            body_answers = [_read_all(s) for kind, s in held if kind == "body"]
            assert all(a.startswith(b"HTTP/1.1 408") for a in body_answers), {a[:40] for a in body_answers}
            assert b"not received within 1 s" in body_answers[0]
            assert all(_read_all(s) == b"" for kind, s in held if kind != "body")  # closed by the server
        finally:
            for _, s in held:
                s.close()


def _read_all(s: socket.socket) -> bytes:
    s.settimeout(60)
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_idle_keep_alive_connection_is_closed_after_the_header_timeout(tmp_path):
    with serving(tmp_path, "--kv-cache-tokens", "2048", "--context-len", "256", "--header-read-timeout", "1") as (
        _proc,
        base,
    ):
        s = _open(int(base.rsplit(":", 1)[1]), b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        s.settimeout(60)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        assert _read_all(s) == b""  # then nothing is sent: the server closes it


def test_a_second_server_on_a_busy_port_fails_at_once_with_a_clear_message(tmp_path):
    """Granian's SO_REUSEPORT would let both listen and split the traffic; the second refuses before loading
    anything. Also: without --profiler-dir the profiler routes do not exist."""
    with serving(tmp_path, "--kv-cache-tokens", "2048", "--context-len", "256") as (_proc, base):
        port = int(base.rsplit(":", 1)[1])
        second = subprocess.run(
            _serve_cmd(port),
            env=dict(os.environ, RINGLLM_CACHE=str(tmp_path)),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr and "in use" in second.stderr
        assert "engine ready" not in second.stderr  # refused before the engine started
        assert httpx.get(base + "/health", timeout=60).status_code == 200
        for route in ("/start_profile", "/stop_profile"):
            assert httpx.post(base + route, timeout=60).status_code == 404


# ---- the profiler routes ----
def test_profiler_routes_with_profiler_dir_work_and_stop_themselves(tmp_path):
    traces = tmp_path / "traces"
    with serving(
        tmp_path,
        "--kv-cache-tokens",
        "2048",
        "--context-len",
        "256",
        "--profiler-dir",
        str(traces),
        "--profiler-max-seconds",
        "1",
    ) as (_proc, base):
        r = httpx.post(base + "/start_profile", timeout=60)
        assert r.status_code == 200 and r.json() == {"profiling": True}
        done = httpx.post(base + "/v1/completions", json={"prompt": "profiled", "max_tokens": 8}, timeout=120)
        assert done.status_code == 200
        assert _gone(lambda: not list(traces.glob("trace-rank0-*.json")), 120)  # it stopped itself
        assert httpx.post(base + "/stop_profile", timeout=60).json() == {"profiling": False}
        assert len(list(traces.glob("*.json"))) == 1  # nothing was running: no second trace
        assert httpx.get(base + "/health", timeout=60).status_code == 200


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
