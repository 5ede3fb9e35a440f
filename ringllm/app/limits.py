"""What a client may hold, as ASGI wrappers around the app: the time and size a request body may take (Granian
has no body timeout), the time a response write may wait for the client to read, and the request slots.
(The connection limits, Granian's, are set by `ringllm serve`: ringllm/serve/host.py.) A connection that sends
its headers and then part of its body reaches this wrapper, which answers 408 once the body-read timeout
passes (measured with Granian 2.8, tests/e2e/test_connections.py)."""

from __future__ import annotations

import asyncio

from ringllm.app.errors import error_body
from ringllm.engine.logs import get_logger

log = get_logger("app")

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


# Routes a probe calls: they take no request slot, so /health answers while every slot is held.
PROBES = frozenset({"/health", "/ping", "/metrics"})


class ClientNotReading(Exception):
    """A response write waited past --send-timeout: the client stopped reading."""


class ClientBounds:
    """ASGI wrapper around `app` so that no client holds a worker for good: every response write must be taken
    by the connection within `send_timeout` seconds (a client that stops reading a stream is cut, and its
    request is aborted in the engine), and at most `request_slots` requests (--backpressure) run at once,
    waiting for a slot otherwise; the probes (PROBES) take none. Granian's own limit counts connections, far
    more of them (--max-connections), so that held slots never keep /health from being accepted."""

    def __init__(self, app, send_timeout: float, request_slots: int | None):
        self.app = app
        self.send_timeout = send_timeout
        self.slots = asyncio.Semaphore(request_slots) if request_slots else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cut = False

        async def timed_send(message) -> None:
            nonlocal cut
            if cut:  # an error answer after the cut (the response had started): nobody reads it
                raise ClientNotReading
            try:
                async with asyncio.timeout(self.send_timeout):
                    await send(message)
            except TimeoutError:
                cut = True
                raise ClientNotReading from None

        try:
            if self.slots is None or scope["path"] in PROBES:
                await self.app(scope, receive, timed_send)
            else:
                async with self.slots:
                    await self.app(scope, receive, timed_send)
        except Exception as e:
            if not _cut(e):
                raise
            log.warning("client stopped reading its response: request cut", path=scope["path"])


def _cut(error: BaseException | None) -> bool:
    """A ClientNotReading, as it comes out of Litestar: alone, in a task group's exception group (a stream's),
    or as the cause of Litestar's "exception caught after response started"."""
    if error is None or isinstance(error, ClientNotReading):
        return error is not None
    inner = getattr(error, "exceptions", None)
    if inner:
        return all(_cut(e) for e in inner)
    return _cut(error.__cause__)
