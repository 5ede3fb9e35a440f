"""Connections against `ringllm serve` on the demo model (issues 12 and 19): silent and partial connections do
not lock anyone out, an idle keep-alive connection is closed after the header timeout, and a second server on
a busy port fails at once with a clear message. Every count and duration is bounded."""

import os
import socket
import subprocess
import sys

import httpx

from tests.helpers import (
    serving,
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
