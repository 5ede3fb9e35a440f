# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_prompt_validation.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real
# model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
#
# Not ported: test_load_prompt_embeds and test_disable_prompt_embeds call vLLM's CompletionRenderer directly
# (its internal Python API) to decode prompt-embedding tensors.
import openai
import pytest
import regex as re

from tests.compat.vllm.utils import MODEL_NAME


@pytest.fixture
async def client(default_server):
    # vLLM starts gpt2 (--enforce-eager) inside each test; the model does not matter to either test.
    # ringllm adaptation: the shared default server.
    async with default_server.get_async_client() as async_client:
        yield async_client


@pytest.mark.asyncio
async def test_empty_prompt(client):
    with pytest.raises(openai.BadRequestError, match="Either prompt or prompt_embeds must be provided and non-empty."):
        await client.completions.create(
            model=MODEL_NAME, prompt="", max_tokens=5, temperature=0.0, extra_body={"prompt_embeds": []}
        )


@pytest.mark.asyncio
async def test_out_of_vocab_token_ids(client):
    with pytest.raises(openai.BadRequestError, match=re.compile(".*out of vocabulary.*").pattern):
        await client.completions.create(model=MODEL_NAME, prompt=[999999], max_tokens=5, temperature=0.0)
