"""Request ids and the access log, as one ASGI wrapper around the whole Litestar app (outside its router, so
that every answer is seen: 404s for unknown routes, 413s, CORS preflights, 5xx).

Each HTTP request gets an id: the client's `X-Request-Id` when it is a sane token, else a fresh uuid4 hex.
The id is the suffix of the response id (`cmpl-<id>`, `chatcmpl-<id>`) and is bound to structlog's context for
the request's task, so that every log line written while serving it carries `request_id`; with
--enable-request-id-headers (vLLM's option; off by default, as there) it is also returned in the `X-Request-Id`
response header. When the response ends, one `access` line records method, path,
status, bytes and duration."""

from __future__ import annotations

import re
import time
import uuid

import structlog

from ringllm.engine.logs import get_logger

HEADER = b"x-request-id"
# What an incoming id may be: an id ends up in headers, JSON and logs, so only a plain token is honoured.
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")

log = get_logger("access")


def incoming_id(headers) -> str | None:
    for name, value in headers:
        if name == HEADER:
            return value.decode() if _SANE_ID.fullmatch(value) else None
    return None


def request_id(request) -> str:
    """The id the wrapper gave this request (a fresh one when the app runs without the wrapper)."""
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


class RequestLog:
    """ASGI wrapper: request id in, request id out (with `id_header`), one access-log line per HTTP request."""

    def __init__(self, app, id_header: bool = False):
        self.app, self.id_header = app, id_header

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = incoming_id(scope.get("headers", ())) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status, sent = 0, 0  # status 0 in the log: no response was started (the client left first)
        start = time.perf_counter()

        async def send_with_id(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.id_header:
                    message = dict(message, headers=[*message.get("headers", ()), (HEADER, rid.encode())])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                await self.app(scope, receive, send_with_id)
            except BaseException:
                status = status or 500
                raise
            finally:
                client = scope.get("client")
                log.info(
                    "access",
                    method=scope.get("method"),
                    path=scope.get("path"),
                    status=status,
                    bytes=sent,
                    duration_ms=round((time.perf_counter() - start) * 1e3, 2),
                    client=f"{client[0]}:{client[1]}" if client else None,
                )
