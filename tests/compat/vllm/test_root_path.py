# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_root_path.py (Copyright contributors to the vLLM project), at
# the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real model.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
"""`--root-path /llm` with an API key: /v1/... and /llm/v1/... both serve, both need the key."""

import contextlib

import openai
import pytest

from tests.compat.vllm.utils import MODEL_NAME, real_server

API_KEY = "abc-123"
ERROR_API_KEY = "abc"
ROOT_PATH = "llm"
SAYING = "Here is a common saying about apple. An apple a day, keeps"


@pytest.fixture(scope="module")
def server(real_model, server_logs):
    # vLLM: Qwen2-1.5B-Instruct, --dtype float16 --enforce-eager --max-model-len 4080 --root-path /llm, and the
    # key in VLLM_API_KEY. ringllm adaptation: the key in RINGLLM_API_KEY (ringllm's name for the same setting).
    args = ["--enforce-eager", "--max-model-len", "4080", "--root-path", "/" + ROOT_PATH]
    with real_server(real_model, server_logs, args, env_dict={"RINGLLM_API_KEY": API_KEY}) as remote:
        yield remote


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "base_url, api_key, expected_error",
    [
        (["v1"], ERROR_API_KEY, openai.AuthenticationError),
        ([ROOT_PATH, "v1"], ERROR_API_KEY, openai.AuthenticationError),
        (["v1"], API_KEY, None),
        ([ROOT_PATH, "v1"], API_KEY, None),
    ],
    ids=["v1-wrong-key", "root-path-wrong-key", "v1", "root-path"],
)
async def test_chat_session_root_path_with_api_key(server, base_url, api_key, expected_error):
    ctx = contextlib.nullcontext() if expected_error is None else pytest.raises(expected_error)
    with ctx:
        async with openai.AsyncOpenAI(api_key=api_key, base_url=server.url_for(*base_url), max_retries=0) as client:
            chat = await client.chat.completions.create(
                model=MODEL_NAME,
                messages=[
                    {"role": "user", "content": "tell me a common saying"},
                    {"role": "assistant", "content": SAYING},
                ],
                extra_body={"continue_final_message": True, "add_generation_prompt": False},
                # ringllm adaptation: max_tokens 64 added (vLLM's is bounded only by the context): the saying ends in a
                # few tokens.
                max_tokens=64,
            )
        assert chat.id is not None
        assert len(chat.choices) == 1
        choice = chat.choices[0]
        assert choice.finish_reason == "stop"
        assert len(choice.message.content) > 0
        assert choice.message.role == "assistant"
