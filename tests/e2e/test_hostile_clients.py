"""Hostile clients against a whole server on loopback (issue 28): clients that never read their streams, idle
and silent connections by the hundred, HTTP/2 prefaces with nothing after them. The demo model on the CPU;
every count and duration is bounded, and each test's server is killed at its end (tests/helpers.py)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time

import httpx

from ringllm.engine.demo import demo_model_path
from tests.helpers import api_workers, engine_pids, serving, wait_both_running

SMALL = ("--kv-cache-tokens", "4096", "--context-len", "512")


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _connect(port: int, first: bytes | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if first:
        s.sendall(first)
    return s


def _health_times(base: str, probes: int) -> list[float]:
    """Seconds each of `probes` /health calls took, one after another; a failure counts as infinite."""
    times = []
    for _ in range(probes):
        t0 = time.monotonic()
        try:
            ok = httpx.get(base + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            ok = False
        times.append(time.monotonic() - t0 if ok else float("inf"))
    return times


def test_clients_that_never_read_their_streams_hold_no_health_probe_out(tmp_path):
    """--backpressure 8 and 8 clients that send a streaming request each and never read a byte of the answer
    (before: the 8 connections filled Granian's slots and /health went unanswered for minutes). /health, and a
    9th client's request once a slot frees, are answered while they hold every request slot."""
    with serving(tmp_path, *SMALL, "--backpressure", "8", "--send-timeout", "2") as (_proc, base):
        body = b'{"prompt": "hold", "max_tokens": 400, "ignore_eos": true, "stream": true}'
        request = (
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        readers = []
        for _ in range(8):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's writes stall
            s.settimeout(30)
            s.connect(("127.0.0.1", _port(base)))
            s.sendall(request)
            readers.append(s)
        try:
            time.sleep(1)  # every slot taken
            times = _health_times(base, 10)
            assert max(times) < 2, times
        finally:
            for s in readers:
                s.close()


def test_health_answers_beside_a_thousand_idle_connections(tmp_path):
    """1,100 connections that send nothing, reopened as the server closes them, for ~12 s (before: ~1,100
    such connections timed out most /health probes): every probe is answered within a second."""
    with serving(tmp_path, *SMALL, "--header-read-timeout", "2") as (_proc, base):
        port = _port(base)
        held = [_connect(port) for _ in range(1100)]
        try:
            deadline, times, reopened = time.monotonic() + 12, [], 0
            while time.monotonic() < deadline:
                times += _health_times(base, 5)
                for i, s in enumerate(held):  # reopen what the server closed (a read of b"" at once)
                    s.setblocking(False)
                    try:
                        closed = s.recv(1) == b""
                    except BlockingIOError:
                        closed = False
                    except OSError:
                        closed = True
                    if closed:
                        s.close()
                        held[i] = _connect(port)
                        reopened += 1
            assert reopened >= 1100  # the server closes silent connections (after the header-read timeout)
            assert max(times) < 1, sorted(times)[-5:]
        finally:
            for s in held:
                s.close()


def _stream(base: str, got: list[str]) -> None:
    body = {"prompt": "leak", "max_tokens": 400, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=240) as r:
            got.append("".join(r.iter_text()))
    except httpx.HTTPError as e:
        got.append(repr(e))


def test_no_answer_names_a_ring_an_engine_pid_or_the_models_path(tmp_path):
    """Issue 28: a stream cut by a dead engine ended with "writer (pid N) of ring /ringllm-N-... has died",
    /v1/models' root was the checkpoint's path, /health named each replica's pid. With --dp-size 2, two streams
    (one per replica), replica 1's engine killed: every answer the public routes give, before and after, is
    searched for the pids, the rings' name prefix and the model's path."""
    model = demo_model_path(tmp_path / "cache")
    args = (*SMALL, "--model", str(model), "--served-model-name", "demo", "--dp-size", "2", "--workers", "1")
    with serving(tmp_path, *args, "--enable-tokenizer-info-endpoint") as (proc, base):
        pids = engine_pids(proc.pid, 2)
        answers: list[str] = []
        # four streams: the least loaded replica takes each, so both replicas get some
        streams = [threading.Thread(target=_stream, args=(base, answers)) for _ in range(4)]
        for t in streams:
            t.start()
        wait_both_running(base)  # not a sleep: on a loaded box 2 s was not enough to see both running
        os.kill(pids[1], signal.SIGKILL)
        for t in streams:
            t.join(300)
        assert any('"error"' in a and "engine replica" in a for a in answers), answers  # one was cut
        for path in ("/health", "/v1/models", "/v1/models/demo", "/version", "/tokenizer_info", "/metrics"):
            answers.append(httpx.get(base + path, timeout=30).text)
        answers.append(httpx.post(base + "/v1/completions", json={"prompt": "x", "model": "nope"}, timeout=30).text)
        answers.append(httpx.post(base + "/tokenize", json={"prompt": "x"}, timeout=30).text)
    assert '"replicas_serving":1' in answers[-8]  # /health, degraded: it says which replica serves
    # A pid counts as a whole number: its digits inside a metric's float (9.752689...) name no process.
    secrets = [rf"(?<![\w.]){pid}(?![\w]|\.\d)" for pid in pids] + [
        re.escape(s) for s in ("ringllm-", str(model), str(tmp_path))
    ]
    for secret in secrets:
        found = [m for a in answers for m in re.finditer(secret, a)]
        assert not found, (secret, [m.string[max(0, m.start() - 200) : m.end() + 80] for m in found])


def _aborted(base: str) -> tuple[float, float]:
    """requests_total{finish_reason="abort"} under ringllm's name and under vLLM's."""
    lines = httpx.get(base + "/metrics", timeout=30).text.splitlines()

    def value(prefix: str) -> float:
        return next(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix) and '"abort"' in line)

    return value("ringllm_requests_total{"), value("vllm:request_success_total{")


def test_requests_cut_by_a_dead_api_worker_count_as_aborted(tmp_path):
    """Issue 28: SIGKILL of the API worker under three streams: the engine aborts their requests, and /metrics,
    answered by the worker started in its place, counts them among the aborted (the dead worker never could)."""
    with serving(tmp_path, *SMALL, "--workers", "1") as (proc, base):
        (worker,) = api_workers(proc.pid)
        assert _aborted(base) == (0, 0)
        answers: list[str] = []
        streams = [threading.Thread(target=_stream, args=(base, answers)) for _ in range(3)]
        for t in streams:
            t.start()
        deadline = time.monotonic() + 60
        while _running(base) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(worker, signal.SIGKILL)
        for t in streams:
            t.join(120)
        deadline, got = time.monotonic() + 120, None
        while got != (3, 3) and time.monotonic() < deadline:
            time.sleep(0.5)
            with contextlib.suppress(httpx.HTTPError):  # until the new worker answers
                got = _aborted(base)
        assert got == (3, 3) and _running(base) == 0


def _running(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    return next(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ringllm_num_requests_running")
    )
