# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_async_tokenization.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real
# model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
import asyncio
import random

import openai
import pytest

from tests.compat.vllm.utils import MODEL_NAME

LONG = " ".join(["A"] * 10_000)  # 10,000 tokens: past the 8192-token context unless truncated


@pytest.fixture(scope="module")
def server(default_server):
    # vLLM: Qwen2.5-1.5B-Instruct with random weights (--load-format dummy), --dtype bfloat16 --max-model-len 8192
    # --enforce-eager --max-num-seqs 128. ringllm adaptation: the shared default server (real weights).
    return default_server


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "create, content",
    [
        (lambda c: c.completions.create, {"prompt": LONG}),
        (lambda c: c.chat.completions.create, {"messages": [{"role": "user", "content": LONG}]}),
    ],
    ids=["completion", "chat"],
)
async def test_with_and_without_truncate(client, create, content):
    """Half the requests truncate their prompt to 1,000 tokens, half are too long: none is a server error."""
    truncations = [1000] * 5 + [None] * 5
    random.shuffle(truncations)

    async def status(truncate) -> int:
        body = {"model": MODEL_NAME, **content, "max_tokens": 10, "extra_body": {"truncate_prompt_tokens": truncate}}
        try:
            await create(client)(**body)
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    assert 500 not in await asyncio.gather(*(status(t) for t in truncations))
