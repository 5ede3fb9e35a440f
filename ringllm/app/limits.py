"""The time and size a request body may take, as an ASGI wrapper around the app: Granian has no body timeout.
(The connection limits, Granian's, are set by `ringllm serve`: ringllm/serve/host.py.) A connection that sends
its headers and then part of its body reaches this wrapper, which answers 408 once the body-read timeout
passes (measured with Granian 2.8, tests/test_hardening.py)."""

from __future__ import annotations

import asyncio

from ringllm.app.errors import error_body

MAX_BODY_BYTES = 8 << 20  # larger bodies get 413


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
    """Wraps ASGI `app`: an HTTP request's whole body is read first, within `timeout` seconds (408 past it;
    --body-read-timeout) and `max_bytes` (413 past it, at once when Content-Length says so), then handed to
    `app` in one piece; later receive() calls (a disconnect) go to the server as before."""

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
