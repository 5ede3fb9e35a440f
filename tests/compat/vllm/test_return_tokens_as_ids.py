# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_return_tokens_as_ids.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real
# model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
"""Logprobs tokens as "token_id:<id>": asked per request (`return_tokens_as_token_ids`) or for every request by
the server option `--return-tokens-as-token-ids`."""

import pytest

from tests.compat.vllm.utils import DEFAULT_ARGS, MODEL_NAME, real_server


@pytest.fixture(scope="module")
def server_fixture(request, default_server, real_model, server_logs):
    # vLLM: Qwen3-0.6B with a LoRA adapter, with and without the server option. ringllm adaptation: without the
    # option, the shared default server; with it, a server of its own (no LoRA either way).
    if not request.param:
        yield default_server, False
        return
    with real_server(real_model, server_logs, [*DEFAULT_ARGS, "--return-tokens-as-token-ids"]) as remote:
        yield remote, True


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "server_fixture",
    [True, False],
    indirect=True,
    ids=["server-option", "request-field"],
)
async def test_completion_return_tokens_as_token_ids_completion(server_fixture, tokenizer):
    server, use_server_flag = server_fixture
    async with server.get_async_client() as client:
        completion = await client.completions.create(
            model=MODEL_NAME,
            # Unicode, so that one character is split across several tokens
            prompt="Say 'Hello, world! 🎉'",
            echo=True,
            temperature=0,
            max_tokens=10,
            logprobs=1,
            extra_body={} if use_server_flag else {"return_tokens_as_token_ids": True},
        )
    choice = completion.choices[0]
    token_strs = choice.logprobs.tokens
    # The sampled tokens and the keys of top_logprobs are written alike (the first, unscored prompt token aside).
    top_keys = [next(iter(top)) for top in choice.logprobs.top_logprobs[1:]]
    assert token_strs[1:] == top_keys
    ids = [int(t.removeprefix("token_id:")) for t in token_strs]
    assert choice.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "server_fixture",
    [True, False],
    indirect=True,
    ids=["server-option", "request-field"],
)
async def test_chat_return_tokens_as_token_ids_completion(server_fixture, tokenizer):
    server, use_server_flag = server_fixture
    async with server.get_async_client() as client:
        response = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[
                {"role": "system", "content": "You like to respond in only emojis, like 🎉"},
                {"role": "user", "content": "Please write some emojis: 🐱🐶🎉"},
            ],
            temperature=0,
            max_tokens=8,
            logprobs=True,
            extra_body={} if use_server_flag else {"return_tokens_as_token_ids": True},
        )
    text = response.choices[0].message.content
    ids = [int(c.token.removeprefix("token_id:")) for c in response.choices[0].logprobs.content]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
