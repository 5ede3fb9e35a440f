# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_orca_metrics.py (Copyright contributors to the vLLM project),
# at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real model.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
"""ORCA load reports: a request with `endpoint-load-metrics-format: TEXT|JSON` gets an `endpoint-load-metrics`
response header."""

import openai
import pytest

from tests.compat.vllm.utils import MODEL_NAME

ONE_PLUS_ONE = [
    {"role": "system", "content": "you are a helpful assistant"},
    {"role": "user", "content": "what is 1+1?"},
]


@pytest.fixture(scope="module")
def server(default_server):
    # vLLM: Qwen3-0.6B, --dtype bfloat16 --max-model-len 8192 --enforce-eager. ringllm adaptation: the shared
    # default server.
    return default_server


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


@pytest.mark.asyncio
async def test_chat_completion_with_orca_header(server):
    client = openai.OpenAI(
        api_key="EMPTY",
        base_url=server.url_for("v1"),
        default_headers={"endpoint-load-metrics-format": "TEXT"},
    )
    raw = client.with_raw_response.chat.completions.create(
        model=MODEL_NAME,
        messages=ONE_PLUS_ONE,
        extra_headers={"endpoint-load-metrics-format": "TEXT"},
        # ringllm adaptation: max_tokens 5 added (vLLM's request has no limit): the test reads a header.
        max_tokens=5,
    )
    assert "endpoint-load-metrics" in raw.http_response.headers


@pytest.mark.asyncio
async def test_completion_with_orca_header(client):
    raw = await client.with_raw_response.completions.create(
        model=MODEL_NAME,
        prompt="Hello, my name is",
        max_tokens=5,
        extra_headers={"endpoint-load-metrics-format": "JSON"},
    )
    assert "endpoint-load-metrics" in raw.http_response.headers


@pytest.mark.asyncio
async def test_single_completion(client):
    completion = await client.completions.create(
        model=MODEL_NAME,
        prompt="Hello, my name is",
        max_tokens=5,
        extra_headers={"endpoint-load-metrics-format": "JSON"},
        temperature=0.0,
    )
    assert completion.id is not None
    assert completion.choices is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert len(choice.text) >= 5
    assert choice.finish_reason == "length"
    # "Hello, my name is" is [9707, 11, 847, 829, 374] for Qwen3's tokenizer and for this model's (Qwen2.5's).
    assert completion.usage == openai.types.CompletionUsage(completion_tokens=5, prompt_tokens=5, total_tokens=10)

    completion = await client.completions.create(
        model=MODEL_NAME, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0
    )
    assert len(completion.choices[0].text) >= 1
    assert completion.choices[0].prompt_logprobs is None
