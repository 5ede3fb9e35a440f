# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_return_token_ids.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real
# model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
"""`return_token_ids`: the prompt's and the completion's token ids in the response (`prompt_token_ids`,
`choices[].token_ids`), whole and streamed."""

import pytest

from tests.compat.vllm.utils import MODEL_NAME

EMOJI_PROMPT = "Complete this sentence with emojis: I love coding 🚀"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "The unit of temperature"},
            },
            "required": ["location"],
        },
    },
}
PARIS = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What's the weather like in Paris?"},
]


@pytest.fixture(scope="module")
def server(default_server):
    # vLLM: Qwen2.5-1.5B-Instruct, --max-model-len 2048 --max-num-seqs 128 --enable-auto-tool-choice
    # --tool-call-parser hermes --enforce-eager. ringllm adaptation: the shared default server: hermes is ringllm's
    # parser for Qwen2.5 models, and tool_choice "auto" is always parsed.
    return default_server


def is_subsequence(part: list[int], whole: list[int]) -> bool:
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


@pytest.mark.asyncio
@pytest.mark.parametrize("return_token_ids", [True, False, None])
async def test_basic_completion_with_emoji(server, tokenizer, return_token_ids):
    extra_body = None if return_token_ids is None else {"return_token_ids": return_token_ids}
    async with server.get_async_client() as client:
        completion = await client.completions.create(
            model=MODEL_NAME, prompt=EMOJI_PROMPT, max_tokens=10, temperature=0, logprobs=1, extra_body=extra_body
        )
        dump = completion.model_dump()
        assert "prompt_token_ids" in dump["choices"][0]  # the key is always there (null unless asked)
        if not return_token_ids:
            assert dump["choices"][0].get("token_ids") is None
            assert dump["choices"][0].get("prompt_token_ids") is None
            return
        choice = completion.choices[0]
        assert isinstance(choice.prompt_token_ids, list)
        assert is_subsequence(tokenizer.encode(EMOJI_PROMPT), choice.prompt_token_ids)
        assert isinstance(choice.token_ids, list) and len(choice.token_ids) > 0
        assert tokenizer.decode(choice.token_ids).startswith(choice.text)

        without = await client.completions.create(
            model=MODEL_NAME,
            prompt=EMOJI_PROMPT,
            max_tokens=10,
            temperature=0,
            logprobs=1,
            extra_body={"return_token_ids": False},
        )
        without_dump = without.model_dump()
        assert without_dump["choices"][0].get("token_ids") is None
        assert without_dump.get("prompt_token_ids") is None


@pytest.mark.asyncio
async def test_chat_completion_with_tool_use(server, tokenizer):
    request = dict(
        model=MODEL_NAME, messages=PARIS, tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=100, temperature=0
    )
    async with server.get_async_client() as client:
        response = await client.chat.completions.create(**request, logprobs=True, extra_body={"return_token_ids": True})
        choice = response.choices[0]
        assert isinstance(choice.token_ids, list)
        assert isinstance(response.prompt_token_ids, list)
        prompt_text = tokenizer.decode(response.prompt_token_ids)
        assert prompt_text.startswith("<|im_start|>system\nYou are a helpful assistant.")
        assert prompt_text.endswith("What's the weather like in Paris?<|im_end|>\n<|im_start|>assistant\n")
        response_text = tokenizer.decode(choice.token_ids)
        # ringllm adaptation: this model writes its call as bare JSON at temperature 0 (vLLM's Qwen3 wraps it in
        # <tool_call> tags); either form, the end-of-turn token last, as in vLLM.
        assert response_text.startswith(('<tool_call>\n{"name": "get_weather"', '{"name": "get_weather"'))
        assert response_text.endswith(("</tool_call><|im_end|>", "}<|im_end|>"))
        if choice.message.tool_calls:
            assert choice.message.tool_calls[0].function.name == "get_weather"

        without = await client.chat.completions.create(**request, logprobs=True, extra_body={"return_token_ids": False})
        assert without.choices[0].token_ids is None
        assert without.prompt_token_ids is None


@pytest.mark.asyncio
async def test_comparison_with_prompt_logprobs_and_logprobs(server, tokenizer):
    async with server.get_async_client() as client:
        completion = await client.completions.create(
            model=MODEL_NAME,
            prompt="Hello, world! How are you today?",
            # ringllm adaptation: max_tokens 20 -> 10 here and 30 -> 10 below: the test compares ids, not lengths.
            max_tokens=10,
            temperature=0,
            echo=True,
            logprobs=1,
            # ringllm adaptation: min_tokens 10. This model answers the prompt with its end-of-turn token at once
            # (text "", token_ids [<|im_end|>], which then does not decode to the text's end, in vLLM as here);
            # the test's premise is an answer in text, which vLLM's model writes.
            extra_body={
                "return_token_ids": True,
                "return_tokens_as_token_ids": True,
                "prompt_logprobs": 1,
                "min_tokens": 10,
            },
        )
        choice = completion.choices[0]
        assert choice.token_ids is not None
        assert choice.prompt_token_ids is not None
        assert choice.prompt_logprobs is not None
        assert choice.logprobs is not None
        # With return_tokens_as_token_ids each logprobs token is "token_id:<id>"; echo puts the prompt's first.
        logprob_ids = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens if t.startswith("token_id:")]
        assert len(choice.token_ids) < len(logprob_ids)
        assert logprob_ids[-len(choice.token_ids) :] == choice.token_ids
        if choice.prompt_token_ids:
            assert "Hello, world" in tokenizer.decode(choice.prompt_token_ids)
        if choice.token_ids:
            assert choice.text.endswith(tokenizer.decode(choice.token_ids))

        stream = await client.completions.create(
            model=MODEL_NAME,
            prompt="Tell me a short fact about Python:",
            max_tokens=10,
            temperature=0,
            stream=True,
            echo=False,
            logprobs=1,
            extra_body={"return_token_ids": True, "return_tokens_as_token_ids": True},
        )
        prompt_ids, token_ids, logprob_ids = [], [], []
        first = True
        async for chunk in stream:
            c = chunk.choices[0]
            logprob_ids += [int(t.removeprefix("token_id:")) for t in c.logprobs.tokens if t.startswith("token_id:")]
            if first:
                prompt_ids = c.prompt_token_ids
                first = False
            token_ids += c.token_ids
        assert len(prompt_ids) > 0
        assert token_ids == logprob_ids


@pytest.mark.asyncio
async def test_chat_completion_with_emoji_and_token_ids(server, tokenizer):
    messages = [
        {"role": "system", "content": "You like to use emojis in your responses."},
        {"role": "user", "content": "Repeat after me: I love cats 🐱"},
    ]
    async with server.get_async_client() as client:
        response = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=50,
            temperature=0,
            logprobs=True,
            extra_body={"return_token_ids": True},
        )
        assert response.choices[0].token_ids is not None
        assert "prompt_token_ids" in response.model_dump()
        assert response.choices[0].message.content is not None
        decoded_prompt = tokenizer.decode(response.prompt_token_ids)
        assert decoded_prompt.startswith("<|im_start|>system\nYou like to use emojis in your responses.")
        assert decoded_prompt.endswith("I love cats 🐱<|im_end|>\n<|im_start|>assistant\n")
        # the ids are the content and the end-of-turn token
        assert tokenizer.decode(response.choices[0].token_ids) == response.choices[0].message.content + "<|im_end|>"

        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=50,
            temperature=0,
            stream=True,
            extra_body={"return_token_ids": True},
        )
        content, ids = "", []
        first = True
        async for chunk in stream:
            if first:  # the prompt's ids come once, in the first chunk
                assert isinstance(chunk.prompt_token_ids, list)
                assert tokenizer.decode(chunk.prompt_token_ids) == decoded_prompt
                first = False
            else:
                assert "prompt_token_ids" not in chunk.model_dump(), "only the first chunk has prompt_token_ids"
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                if "token_ids" in chunk.choices[0].model_dump():
                    ids.extend(chunk.choices[0].token_ids)
        assert len(content) > 0
        assert len(ids) > 0
        assert tokenizer.decode(ids) == content + "<|im_end|>"
