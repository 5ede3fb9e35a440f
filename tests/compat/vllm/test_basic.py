# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_basic.py (Copyright contributors to the vLLM project), at the
# commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real model.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
import asyncio
import importlib.metadata
from http import HTTPStatus

import openai
import pytest
import requests

from tests.compat.vllm.utils import DEFAULT_ARGS, MODEL_NAME, SKIP_PROCESS_LAYOUT, real_server


@pytest.fixture(scope="module")
def server_args(request) -> list[str]:
    """Extra server arguments, by indirect parametrization (as in vLLM)."""
    val = getattr(request, "param", [])
    return [val] if isinstance(val, str) else list(val)


@pytest.fixture(scope="module")
def server(server_args, default_server, real_model, server_logs):
    if not server_args:
        yield default_server
        return
    with real_server(real_model, server_logs, [*DEFAULT_ARGS, *server_args]) as remote:
        yield remote


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


LAYOUTS = [
    pytest.param([], id="default-frontend-multiprocessing"),
    pytest.param(
        ["--disable-frontend-multiprocessing"], id="disable-frontend-multiprocessing", marks=SKIP_PROCESS_LAYOUT
    ),
]


@pytest.mark.parametrize("server_args", LAYOUTS, indirect=True)
@pytest.mark.asyncio
async def test_show_version(server):
    response = requests.get(server.url_for("version"))
    response.raise_for_status()
    # ringllm adaptation: the server reports its own version (vLLM's test expects vLLM's __version__).
    assert response.json() == {"version": importlib.metadata.version("ringllm")}


@pytest.mark.parametrize("server_args", LAYOUTS, indirect=True)
@pytest.mark.asyncio
async def test_check_health(server):
    assert requests.get(server.url_for("health")).status_code == HTTPStatus.OK


@pytest.mark.parametrize(
    "server_args",
    [
        pytest.param(["--max-model-len", "10100"], id="default-frontend-multiprocessing"),
        pytest.param(
            ["--disable-frontend-multiprocessing", "--max-model-len", "10100"],
            id="disable-frontend-multiprocessing",
            marks=SKIP_PROCESS_LAYOUT,
        ),
    ],
    indirect=True,
)
@pytest.mark.asyncio
async def test_request_cancellation(server):
    # 200 requests of 10,000 tokens each with a 0.5 s client timeout: every one times out and is abandoned;
    # a server that kept computing them could not answer the next request in time.
    chat_input = [{"role": "user", "content": "Write a long story"}]
    async with server.get_async_client(timeout=0.5) as impatient:
        tasks = [
            asyncio.create_task(
                impatient.chat.completions.create(
                    messages=chat_input, model=MODEL_NAME, max_tokens=10000, extra_body={"min_tokens": 10000}
                )
            )
            for _ in range(200)
        ]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.ALL_COMPLETED)
    assert not pending
    for task in done:  # every one a timeout, not a 400 that would make the test meaningless
        with pytest.raises(openai.APITimeoutError):
            task.result()

    # ringllm adaptation: 5 s -> 30 s for 10 tokens: the real model writes 0.7-5 tokens/s on the CPU test box.
    async with server.get_async_client(timeout=30) as patient:
        response = await patient.chat.completions.create(messages=chat_input, model=MODEL_NAME, max_tokens=10)
    assert len(response.choices) == 1


@pytest.mark.asyncio
async def test_request_wrong_content_type(server):
    async with server.get_async_client() as client:
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(
                messages=[{"role": "user", "content": "Write a long story"}],
                model=MODEL_NAME,
                max_tokens=10000,
                extra_headers={"Content-Type": "application/x-www-form-urlencoded"},
            )


@pytest.mark.parametrize(
    "server_args", [pytest.param(["--enable-server-load-tracking"], id="enable-server-load-tracking")], indirect=True
)
@pytest.mark.asyncio
async def test_server_load(server):
    def load() -> int:
        response = requests.get(server.url_for("load"))
        assert response.status_code == HTTPStatus.OK
        return response.json().get("server_load")

    assert load() == 0

    def long_completion():
        return requests.post(
            server.url_for("v1/completions"),
            headers={"Content-Type": "application/json"},
            # ringllm adaptation: max_tokens 1000 -> 20: enough to be in flight for seconds on CPU.
            json={"prompt": "Give me a long story", "max_tokens": 20, "temperature": 0},
        )

    in_flight = asyncio.create_task(asyncio.to_thread(long_completion))
    await asyncio.sleep(0.1)
    assert load() == 1
    await in_flight
    await asyncio.sleep(0.1)
    assert load() == 0
