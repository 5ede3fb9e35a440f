# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_token_in_token_out.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real
# model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
import pytest

from tests.compat.vllm.utils import MODEL_NAME, real_server


@pytest.fixture(scope="module")
def server(real_model, server_logs):
    # vLLM: Qwen3-0.6B's config without its tokenizer files, --max-model-len 2048 --max-num-seqs 128
    # --enforce-eager --skip-tokenizer-init --load-format dummy (random weights, for speed).
    # ringllm adaptation: the real model and its real weights (no --load-format dummy); the GGUF file carries its
    # tokenizer, so --skip-tokenizer-init is what says not to use it.
    args = ["--max-model-len", "2048", "--max-num-seqs", "128", "--enforce-eager", "--skip-tokenizer-init"]
    with real_server(real_model, server_logs, args) as remote:
        yield remote


@pytest.mark.asyncio
async def test_token_in_token_out_and_logprobs(server, tokenizer):
    """Token ids in, token ids out, with no tokenizer in the server."""
    text = "Hello, world! How are you today?"
    token_ids = tokenizer.encode(text)
    async with server.get_async_client() as client:
        completion = await client.completions.create(
            model=MODEL_NAME,
            prompt=token_ids,
            max_tokens=20,
            temperature=0,
            echo=True,
            extra_body={"return_token_ids": True},
        )
    choice = completion.choices[0]
    assert choice.token_ids is not None and 0 < len(choice.token_ids) <= 20
    assert choice.prompt_token_ids is not None
    if choice.prompt_token_ids:
        assert tokenizer.decode(choice.prompt_token_ids) == text
