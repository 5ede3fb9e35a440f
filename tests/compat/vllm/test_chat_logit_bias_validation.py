# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_chat_logit_bias_validation.py (Copyright contributors to the
# vLLM project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's
# real model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
import openai
import pytest

from tests.compat.vllm.utils import MODEL_NAME


@pytest.fixture(scope="module")
def server(default_server):
    # vLLM: Qwen2.5-1.5B-Instruct, --dtype bfloat16 --max-model-len 1024 --enforce-eager.
    # ringllm adaptation: the shared default server (its 8192-token context changes nothing here).
    return default_server


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


@pytest.mark.asyncio
async def test_chat_logit_bias_valid(client, vocab_size):
    """The last token id of the vocabulary takes a bias."""
    chat = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Testing valid logit bias"}],
        max_tokens=5,
        logit_bias={str(vocab_size - 1): 1.0},
    )
    assert chat.choices[0].message.content is not None


@pytest.mark.asyncio
async def test_chat_logit_bias_invalid(client, vocab_size):
    """A token id past the vocabulary is a 400 naming the id and the vocabulary's size."""
    invalid = vocab_size + 1
    with pytest.raises(openai.BadRequestError) as excinfo:
        await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "Testing invalid logit bias"}],
            max_tokens=5,
            logit_bias={str(invalid): 1.0},
        )
    error = excinfo.value
    assert error.status_code == 400
    assert str(invalid) in str(error)
    assert str(vocab_size) in str(error)
