"""Server-sent events (app/sse.py): a stream that fails with an unexpected error ends with an error event rather
than a cut connection."""

import json


def test_a_stream_that_fails_unexpectedly_ends_with_an_error_event():
    import asyncio

    from ringllm.app.sse import sse_stream

    async def events():
        yield b"data: {}\n\n"
        raise RuntimeError("a bug")

    async def frames():
        return [f async for f in sse_stream(events())]

    got = asyncio.run(frames())
    assert got[0] == b"data: {}\n\n" and json.loads(got[-1][6:])["error"]["type"] == "server_error"
