"""What a client may hold of an API worker (app/limits.py) and the Host check (app/guard.py), over a FakeEngine: a
response write that waits past --send-timeout cuts the request (a client that stopped reading) and aborts it in
the engine; --backpressure request slots leave the probes out."""

from __future__ import annotations

import asyncio
import json

import pytest
from litestar.testing import TestClient

from ringllm.app.server import create_app
from ringllm.app.worker import Services
from tests.app.conftest import FakeStatus
from tests.app.test_server import _settings


@pytest.fixture
def app_over(build, tokenizer_dir):
    """app_over(**settings) -> (the ASGI app over a FakeEngine whose generations never end, the Serving)."""

    def make(**fields):
        serving = build(**fields)
        serving.engine.reply = serving.engine.text_reply("a b c d e f g h", hang=True)
        services = Services(serving.model, serving.completions, serving.chat, serving.tokenize, FakeStatus())
        return create_app(_settings(tokenizer_dir, **fields), services), serving

    return make


def _scope(method: str, path: str, body: bytes) -> dict:
    headers = [(b"host", b"localhost:8000"), (b"content-type", b"application/json")]
    headers.append((b"content-length", str(len(body)).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


class Client:
    """One connection: sends `body`, then takes response writes until `reads` body writes were taken; every
    later write waits until `resume` is set (a client that stopped reading: its socket buffer is full)."""

    def __init__(self, reads: int):
        self.reads, self.status, self.chunks = reads, 0, []
        self.resume, self.left = asyncio.Event(), asyncio.Event()

    async def call(self, app, method: str, path: str, payload=None) -> None:
        body = b"" if payload is None else json.dumps(payload).encode()
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await self.left.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                self.status = message["status"]
            elif message.get("body"):
                if len(self.chunks) >= self.reads:
                    await self.resume.wait()
                self.chunks.append(message["body"])

        await app(_scope(method, path, body), receive, send)


STREAM = {"prompt": "x", "max_tokens": 1000, "stream": True}


def test_a_stream_whose_client_stopped_reading_is_cut_after_the_send_timeout_and_aborted(app_over):
    app, serving = app_over(send_timeout=0.5)

    async def run():
        client = Client(reads=2)
        await asyncio.wait_for(client.call(app, "POST", "/v1/completions", STREAM), 20)  # returns: not held
        return client

    client = asyncio.run(run())
    assert client.status == 200 and len(client.chunks) == 2
    assert serving.engine.aborted == [serving.engine.submitted[0][0]]  # the engine stops generating for it
    assert serving.count("abort") == 1


def test_request_slots_leave_health_and_metrics_free(app_over):
    """--backpressure 1: a stream that holds the one slot makes the next completion wait for it, while /health
    and /metrics answer at once; the slot passes on once the stream is cut."""
    app, serving = app_over(send_timeout=1.0, request_slots=1)

    async def run():
        holder = Client(reads=1)
        held = asyncio.create_task(holder.call(app, "POST", "/v1/completions", STREAM))
        while not holder.chunks:
            await asyncio.sleep(0.01)
        waiting = Client(reads=1)
        queued = asyncio.create_task(waiting.call(app, "POST", "/v1/completions", STREAM))
        for path in ("/health", "/metrics"):
            probe = Client(reads=10)
            await asyncio.wait_for(probe.call(app, "GET", path), 5)
            assert probe.status == 200, path
        await asyncio.sleep(0.3)
        assert not queued.done() and len(serving.engine.submitted) == 1  # waits for the slot, not in the engine
        await asyncio.wait_for(held, 20)  # cut after the send timeout: the slot is free
        await asyncio.wait_for(queued, 20)  # it took the slot, streamed, stopped reading and was cut in turn
        return waiting

    waiting = asyncio.run(run())
    assert waiting.status == 200 and waiting.chunks and len(serving.engine.submitted) == 2
    assert serving.count("abort") == 2


@pytest.mark.parametrize(
    "host,status",
    [
        ("localhost:8000", 200),
        ("LOCALHOST.", 200),
        ("app.localhost", 200),
        ("127.0.0.1:8000", 200),
        ("[::1]:8000", 200),
        ("10.1.2.3", 200),
        ("served.example:8000", 200),  # --allowed-hosts served.example
        ("rebind.attacker.test", 421),
        ("rebind.attacker.test:8000", 421),
        ("localhost.attacker.test", 421),
    ],
)
def test_the_host_header_must_name_this_server(app_over, host, status):
    """DNS rebinding: a page on rebind.attacker.test, whose name now resolves to 127.0.0.1, must not drive the
    local server; every route, /health too, answers 421 naming the option that would allow the name."""
    client = TestClient(app_over(allowed_hosts=["served.example"])[0])
    for path in ("/health", "/v1/models"):  # (this fake engine never ends a generation)
        r = client.get(path, headers={"host": host})
        assert r.status_code == status, (host, r.text)
    if status == 421:
        assert r.json()["error"]["param"] == "host" and "--allowed-hosts" in r.json()["error"]["message"]


def test_any_host_with_a_star(app_over):
    client = TestClient(app_over(allowed_hosts=["*"])[0])
    assert client.get("/health", headers={"host": "rebind.attacker.test"}).status_code == 200
