"""What bounds a client's hold on the server: connection limits and timeouts (Granian's, set by `ringllm serve`),
the time to read a request body (an ASGI wrapper around the app, because Granian has no body timeout), the
profiler routes and the engine-stall limit behind /health.

Measured with Granian 2.8 (the silent, partial and keep-alive connection tests in tests/test_hardening.py):
under HTTP/1 a connection that sends nothing, part of a request line or part of its headers is closed after the
header-read timeout, and so is an idle keep-alive connection; under `--http auto` (HTTP/1 and h2c) a connection
that sends nothing is held forever while Granian waits to see which protocol it speaks. A connection that sends
its headers and then part of its body reaches the app, which answers 408 once the body-read timeout passes."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass

from ringllm.app.errors import error_body
from ringllm.engine.config import setting

MAX_BODY_BYTES = 8 << 20  # larger bodies get 413


@dataclass
class ServeLimits:
    """`ringllm serve` options of this module (the CLI is generated from these fields)."""

    http: str = setting(
        "1",
        "HTTP protocols: 1 (HTTP/1.1) or auto (HTTP/1.1 and h2c; a connection that sends "
        "nothing is then never timed out)",
        choices=("1", "auto"),
    )
    header_read_timeout: float = setting(
        10.0,
        "seconds a connection may take to send a request's headers; also "
        "how long an idle keep-alive connection stays open (at most 60)",
    )
    body_read_timeout: float = setting(30.0, "seconds a client may take to send a request's body (408 after)")
    backlog: int = setting(1024, "connections the kernel queues for the server before refusing more (at least 128)")
    backpressure: int | None = setting(
        None, "connections each API worker serves at once; more wait in the backlog (default: backlog / workers)"
    )
    profiler_dir: str | None = setting(
        None,
        "enables POST /start_profile and /stop_profile, writing traces here (default: the routes do not exist)",
        metavar="DIR",
    )
    profiler_max_seconds: float = setting(10.0, "a profile started by /start_profile stops itself after this long")
    engine_stall_timeout: float = setting(
        30.0,
        "/health answers 503 once the engine's loop has not turned for this long (hung, stopped or stuck in one step)",
    )


def granian_options(limits: ServeLimits | argparse.Namespace, workers: int) -> dict:
    """Keyword arguments for Granian(...), from a ServeLimits or the parsed `ringllm serve` arguments."""
    from granian.constants import HTTPModes
    from granian.http import HTTP1Settings

    header_ms = min(60_000, max(1, round(limits.header_read_timeout * 1000)))  # Granian's range
    return {
        "http": HTTPModes.http1 if limits.http == "1" else HTTPModes.auto,
        "backlog": max(128, limits.backlog),
        "backpressure": limits.backpressure or max(1, limits.backlog // max(1, workers)),
        "http1_settings": HTTP1Settings(header_read_timeout=header_ms, keep_alive=True),
    }


async def _answer(send, status: int, message: str) -> None:
    """An error in OpenAI's shape; `connection: close` since the rest of the body will not be read."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": error_body(message)})


def bound_body_reads(app, timeout: float, max_bytes: int = MAX_BODY_BYTES):
    """Wraps ASGI `app`: an HTTP request's whole body is read first, within `timeout` seconds (408 past it) and
    `max_bytes` (413 past it, at once when Content-Length says so), then handed to `app` in one piece; later
    receive() calls (a disconnect) go to the server as before."""

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return await _answer(send, 413, f"the request body is over the limit of {max_bytes} bytes")
        chunks, size, first = [], 0, None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        first = message  # the client left: the app sees the disconnect
                        break
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > max_bytes:
                        return await _answer(send, 413, f"the request body is over the limit of {max_bytes} bytes")
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await _answer(send, 408, f"the request body was not received within {timeout:g} s")
        pending = [first or {"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        return await app(scope, replay, send)

    return wrapped
