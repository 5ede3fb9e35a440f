# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_chat_echo.py (Copyright contributors to the vLLM project), at
# the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real model.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
import pytest

from tests.compat.vllm.utils import DEFAULT_ARGS, MODEL_NAME, real_server

SAYING = "Here is a common saying about apple. An apple a day, keeps"
BEIJING = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Beijing is the capital of which country?"},
]


@pytest.fixture(scope="module")
def server(default_server):
    # vLLM: one server (Qwen2-1.5B-Instruct, --max-model-len 4080 --max-logprobs 151936) for the whole module.
    # ringllm adaptation: the echo test runs on the shared default server; only the two tests that need
    # --max-logprobs (a logprobs count of -1: the whole vocabulary) get a server started with it.
    return default_server


@pytest.fixture(scope="module")
def all_logprobs_server(real_model, server_logs):
    with real_server(real_model, server_logs, [*DEFAULT_ARGS, "--max-logprobs", "151936"]) as remote:
        yield remote


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


@pytest.fixture
async def all_logprobs_client(all_logprobs_server):
    async with all_logprobs_server.get_async_client() as async_client:
        yield async_client


@pytest.mark.asyncio
@pytest.mark.parametrize("echo", [True, False], ids=["echo", "no-echo"])
async def test_chat_session_with_echo_and_continue_final_message(client, echo):
    chat = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "tell me a common saying"}, {"role": "assistant", "content": SAYING}],
        extra_body={"echo": echo, "continue_final_message": True, "add_generation_prompt": False},
        # ringllm adaptation: max_tokens 64 added (vLLM's request is bounded only by its 4080-token context):
        # the saying's end ("the doctor away.") is a few tokens; this bounds a wandering answer on CPU.
        max_tokens=64,
    )
    assert chat.id is not None
    assert len(chat.choices) == 1
    choice = chat.choices[0]
    assert choice.finish_reason == "stop"
    message = choice.message
    assert message.content is not None
    assert (SAYING in message.content) == echo  # the final message comes back only with echo
    assert message.role == "assistant"


# whole-vocabulary logprobs: --max-logprobs 151936 does not start (the sampler returns at most 20); kept by decision
@pytest.mark.vllm_compat
@pytest.mark.asyncio
async def test_prompt_logprobs(all_logprobs_client):
    chat = await all_logprobs_client.chat.completions.create(
        model=MODEL_NAME,
        messages=BEIJING,
        extra_body={"prompt_logprobs": -1},
        # ringllm adaptation: max_tokens 5 added (vLLM's request has no limit): the test reads the prompt's logprobs.
        max_tokens=5,
    )
    assert chat.prompt_logprobs is not None and len(chat.prompt_logprobs) > 0


# whole-vocabulary logprobs (top_logprobs -1): the sampler returns at most 20 per token; kept by decision
@pytest.mark.vllm_compat
@pytest.mark.asyncio
async def test_top_logprobs(all_logprobs_client, vocab_size):
    chat = await all_logprobs_client.chat.completions.create(
        model=MODEL_NAME,
        messages=BEIJING,
        max_tokens=1,
        extra_body={"top_logprobs": -1, "logprobs": "true"},
    )
    logprobs = chat.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None and len(logprobs.content) > 0
    assert len(logprobs.content[0].top_logprobs) == vocab_size
