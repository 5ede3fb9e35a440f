# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_chunked_prompt.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real
# model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
import pytest

from tests.compat.vllm.utils import DEFAULT_ARGS, MODEL_NAME, real_server

LONG_QUESTION = "What is the capital of France?" * 400  # ~2,800 tokens: prefilled in three 1,000-token chunks


@pytest.fixture(scope="module")
def server(real_model, server_logs):
    # vLLM: --enable-chunked-prefill --max-num-batched-tokens 1000 on top of the common arguments.
    # ringllm adaptation: --enable-chunked-prefill is left out: ringllm always prefills in chunks of the step's
    # token budget (--max-num-batched-tokens), and has no option to turn it on.
    with real_server(real_model, server_logs, [*DEFAULT_ARGS, "--max-num-batched-tokens", "1000"]) as remote:
        yield remote


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


@pytest.mark.asyncio
async def test_completion_stream_options_and_logprobs_with_long_prompts(client):
    stream = await client.completions.create(
        model=MODEL_NAME,
        prompt=LONG_QUESTION,
        max_tokens=5,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        logprobs=5,
    )
    tokens_received = 0
    finished = False
    async for chunk in stream:
        assert chunk.usage.prompt_tokens >= 0
        assert chunk.usage.completion_tokens >= 0
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        if not finished:
            tokens_received += 1
            assert chunk.choices[0].text
            finished = chunk.choices[0].finish_reason is not None
        if finished:
            assert chunk.usage.completion_tokens == tokens_received


@pytest.mark.asyncio
async def test_chat_completion_stream_options_and_logprobs_with_long_prompts(client):
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": LONG_QUESTION},
        ],
        max_tokens=5,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
        logprobs=True,
        top_logprobs=5,
    )
    tokens_received = 0
    empty_chunks = 0
    finished = False
    async for chunk in stream:
        assert chunk.usage.prompt_tokens >= 0
        assert chunk.usage.completion_tokens >= 0
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        if not finished:
            if chunk.choices[0].delta.content == "":
                # the role chunk, before any token: no tokens counted, no logprobs
                assert chunk.usage.completion_tokens == 0
                assert chunk.choices[0].logprobs is None
                empty_chunks += 1
            else:
                tokens_received += 1
            finished = chunk.choices[0].finish_reason is not None
        if finished:
            assert chunk.usage.completion_tokens == tokens_received
    assert empty_chunks <= 1
