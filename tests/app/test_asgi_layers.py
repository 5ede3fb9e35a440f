"""The ASGI layers of --root-path and --enable-server-load-tracking, over a bare ASGI app."""

from __future__ import annotations

import asyncio

from ringllm.app.asgi_layers import ServedUnder, ServerLoad


def test_server_load_counts_model_routes_until_their_response_is_over():
    release = asyncio.Event()
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        if scope["path"] != "/health":
            await release.wait()

    load = ServerLoad().wrap(app)

    async def scenario():
        def call(path: str):
            return asyncio.create_task(load({"type": "http", "path": path}, None, None))

        running = [call("/v1/completions"), call("/v1/chat/completions"), call("/invocations")]
        await call("/health")
        await asyncio.sleep(0)
        assert load.in_flight == 3
        cancelled = running.pop()
        cancelled.cancel()  # a client that left: no longer in flight
        await asyncio.sleep(0)
        assert load.in_flight == 2
        release.set()
        await asyncio.gather(*running)
        assert load.in_flight == 0

    asyncio.run(scenario())
    assert seen.count("/health") == 1


def test_served_under_moves_the_prefix_to_root_path():
    scopes: list[dict] = []

    async def app(scope, receive, send):
        scopes.append(scope)

    layer = ServedUnder(app, "llm/")
    for path in ("/llm/v1/models", "/llm", "/v1/models", "/llmx/v1"):
        asyncio.run(layer({"type": "http", "path": path, "raw_path": path.encode(), "root_path": ""}, None, None))
    assert [(s["path"], s["root_path"]) for s in scopes] == [
        ("/v1/models", "/llm"),
        ("/", "/llm"),
        ("/v1/models", ""),
        ("/llmx/v1", ""),
    ]
    assert scopes[0]["raw_path"] == b"/v1/models"
