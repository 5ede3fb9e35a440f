"""Server-sent events as OpenAI streams them: pre-encoded `data: <json>\\n\\n` frames (Litestar's
ServerSentEvent ends events with `\\r\\n\\r\\n`, which clients that split on `\\n\\n` never see), `data: [DONE]`
at the end, and an error event in place of whatever a failure cut short."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec

from ringllm.app.errors import ApiError, error_body
from ringllm.engine.logs import get_logger

log = get_logger("app")
DONE = b"data: [DONE]\n\n"
_json = msgspec.json.Encoder()


def event(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


async def sse_stream(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Passes SSE frames through; a failure after the response started becomes a final error event."""
    try:
        async for frame in events:
            yield frame
    except ApiError as e:
        yield b"data: " + e.body() + b"\n\n"
    except Exception:  # a bug must still end the stream visibly, not cut it without a word
        log.exception("stream failed")
        yield b"data: " + error_body("internal error", "server_error") + b"\n\n"
