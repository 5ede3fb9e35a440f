# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/v1/entrypoints/openai/test_completion.py (Copyright contributors to the vLLM project),
# at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real model.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
import openai
import pytest
import regex as re
from openai import BadRequestError

from tests.compat.vllm.utils import MODEL_NAME, SKIP_PROCESS_LAYOUT
from tests.compat.vllm.v1.test_chat_completion import INVALID_JSON_SCHEMA, INVALID_SQL_GRAMMAR

ZEROS = [0, 0, 0, 0, 0]


@pytest.fixture(
    scope="module", params=["prefix-caching-off", pytest.param("in-process-frontend", marks=SKIP_PROCESS_LAYOUT)]
)
def server(default_server, request):
    # vLLM: facebook/opt-125m, --dtype float32 --max-model-len 2048 --max-num-seqs 128 --enforce-eager
    # --enable-prompt-tokens-details, with --no-enable-prefix-caching (and again with
    # --disable-frontend-multiprocessing). ringllm adaptation: the shared default server, its radix cache on: no
    # test here reads cached tokens, and ringllm computes a whole prompt when its logprobs are asked.
    # --enable-prompt-tokens-details (usage.prompt_tokens_details) has no ringllm option and no test here reads it;
    # tests/compat/test_known_defects.py checks usage.prompt_tokens_details.cached_tokens.
    return default_server


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


@pytest.mark.asyncio
async def test_single_completion(client, tokenizer):
    prompt = "Hello, my name is"
    completion = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0.0)
    assert completion.id is not None
    assert completion.choices is not None and len(completion.choices) == 1
    choice = completion.choices[0]
    assert len(choice.text) >= 5
    assert choice.finish_reason == "length"
    # ringllm adaptation: the prompt's length for this model's tokenizer (5, no BOS; opt-125m's is 6 with its BOS).
    prompt_tokens = len(tokenizer.encode(prompt))
    assert completion.usage == openai.types.CompletionUsage(
        completion_tokens=5, prompt_tokens=prompt_tokens, total_tokens=prompt_tokens + 5
    )

    completion = await client.completions.create(model=MODEL_NAME, prompt=ZEROS, max_tokens=5, temperature=0.0)
    assert len(completion.choices[0].text) >= 1
    assert completion.choices[0].prompt_logprobs is None


@pytest.mark.asyncio
async def test_no_logprobs(client):
    completion = await client.completions.create(
        model=MODEL_NAME, prompt=ZEROS, max_tokens=5, temperature=0.0, logprobs=None
    )
    assert completion.choices[0].logprobs is None


@pytest.mark.asyncio
async def test_zero_logprobs(client):
    completion = await client.completions.create(
        model=MODEL_NAME, prompt=ZEROS, max_tokens=5, temperature=0.0, logprobs=0
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert len(logprobs.top_logprobs[0]) == 1


@pytest.mark.asyncio
async def test_some_logprobs(client):
    completion = await client.completions.create(
        model=MODEL_NAME, prompt=ZEROS, max_tokens=5, temperature=0.0, logprobs=5
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert 5 <= len(logprobs.top_logprobs[0]) <= 6  # the top 5, and the sampled token if it is not among them


@pytest.mark.asyncio
async def test_too_many_completion_logprobs(client):
    # vLLM's default --max-logprobs is 20 (for both routes): 21 and 30 are refused, whole or streamed.
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        await client.completions.create(model=MODEL_NAME, prompt=ZEROS, max_tokens=5, temperature=0.0, logprobs=21)
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=ZEROS, max_tokens=5, temperature=0.0, logprobs=30, stream=True
        )
        async for _ in stream:
            pass
    completion = await client.completions.create(model=MODEL_NAME, prompt=ZEROS, max_tokens=5, temperature=0.0)
    assert completion.choices[0].text is not None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "prompt_logprobs",
    [
        -1,
        0,
        1,
        None,
    ],
)
async def test_prompt_logprobs_completion(client, prompt_logprobs):
    params: dict = {"prompt": ["A robot may not injure another robot", "My name is"], "model": MODEL_NAME}
    if prompt_logprobs is not None:
        params["extra_body"] = {"prompt_logprobs": prompt_logprobs}
    if prompt_logprobs is not None and prompt_logprobs < 0:
        with pytest.raises(BadRequestError):
            await client.completions.create(**params)
        return
    completion = await client.completions.create(**params)
    if prompt_logprobs is None:
        assert completion.choices[0].prompt_logprobs is None
    else:
        for choice in completion.choices[:2]:
            assert choice.prompt_logprobs is not None and len(choice.prompt_logprobs) > 0


@pytest.mark.asyncio
async def test_completion_streaming(client):
    prompt = "What is an LLM?"
    whole = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0.0)
    stream = await client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0.0, stream=True
    )
    pieces: list[str] = []
    finish_reasons = 0
    async for chunk in stream:
        pieces.append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reasons += 1
    assert finish_reasons == 1  # only in the last chunk
    assert chunk.choices[0].finish_reason == "length"
    assert chunk.choices[0].text
    assert "".join(pieces) == whole.choices[0].text


def assert_unique(texts: list[str], n: int) -> None:
    counts: dict[str, int] = {}
    for text in texts:
        counts[text] = counts.get(text, 0) + 1
    repeats = {t: c for t, c in counts.items() if c > 1}
    assert len(counts) == n, f"Expected {n} unique completions, got {len(counts)}; repeats: {repeats}."


@pytest.mark.asyncio
async def test_parallel_no_streaming(client):
    """n = 3 samples in one response: indexed, each with a finish reason, finishing at different lengths, unique."""
    n, max_tokens = 3, 50  # long enough for some to finish before others
    completion = await client.completions.create(
        model=MODEL_NAME,
        prompt="What is an LLM?",
        max_tokens=max_tokens,
        n=n,
        temperature=1.0,
        stream=False,
        logprobs=0,
        seed=42,
    )
    assert len(completion.choices) == n
    lengths = set()
    for index, choice in enumerate(completion.choices):
        assert choice.index == index
        assert choice.finish_reason is not None
        lengths.add(len(choice.logprobs.tokens))
    assert len(lengths) > 1
    assert_unique([c.text for c in completion.choices], n)


@pytest.mark.asyncio
async def test_parallel_streaming(client):
    """n = 3 samples in one stream, told apart by index."""
    n, max_tokens = 3, 50
    stream = await client.completions.create(
        model=MODEL_NAME, prompt="What is an LLM?", max_tokens=max_tokens, n=n, temperature=1.0, stream=True, seed=42
    )
    pieces: list[list[str]] = [[] for _ in range(n)]
    finish_reasons = 0
    async for chunk in stream:
        pieces[chunk.choices[0].index].append(chunk.choices[0].text)
        if chunk.choices[0].finish_reason is not None:
            finish_reasons += 1
    assert finish_reasons == n
    lengths = {len(p) for p in pieces}
    assert all(length <= max_tokens for length in lengths)
    assert len(lengths) > 1
    assert_unique(["".join(p) for p in pieces], n)


@pytest.mark.asyncio
async def test_completion_stream_options(client):
    common = dict(model=MODEL_NAME, prompt="What is the capital of France?", max_tokens=5, temperature=0.0)

    def check_usage(usage) -> None:
        assert usage is not None
        assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    # include_usage false (continuous_usage_stats either way): no usage
    for continuous in (False, True):
        stream = await client.completions.create(
            **common, stream=True, stream_options={"include_usage": False, "continuous_usage_stats": continuous}
        )
        async for chunk in stream:
            assert chunk.usage is None

    # include_usage only: usage once, in a last chunk with no choices
    stream = await client.completions.create(
        **common, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": False}
    )
    async for chunk in stream:
        assert chunk.usage is None
        if chunk.choices[0].finish_reason is not None:
            final = await anext(stream)
            check_usage(final.usage)
            assert final.choices == []

    # both: usage in every chunk, and the last one
    stream = await client.completions.create(
        **common, stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}
    )
    async for chunk in stream:
        check_usage(chunk.usage)
        if chunk.choices[0].finish_reason is not None:
            final = await anext(stream)
            check_usage(final.usage)
            assert final.choices == []

    # stream_options without streaming: 400
    for options in (
        {"include_usage": None},
        {"include_usage": True},
        {"continuous_usage_stats": None},
        {"continuous_usage_stats": True},
    ):
        with pytest.raises(BadRequestError):
            await client.completions.create(**common, stream=False, stream_options=options)


@pytest.mark.asyncio
async def test_batch_completions(client):
    for prompts in (["Hello, my name is"] * 2, [ZEROS] * 2):
        batch = await client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=5, temperature=0.0)
        assert len(batch.choices) == 2
        assert batch.choices[0].text == batch.choices[1].text
        # ringllm adaptation: vLLM's n=2 block here uses beam search (use_beam_search); it is
        # test_batch_completions_beam_search below, skipped.
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=prompts, max_tokens=5, temperature=0.0, stream=True
        )
        texts = ["", ""]
        async for chunk in stream:
            assert len(chunk.choices) == 1
            texts[chunk.choices[0].index] += chunk.choices[0].text
        assert texts[0] == texts[1]


@pytest.mark.skip(reason="beam search (use_beam_search): outside this port, as the issue scopes it")
@pytest.mark.asyncio
async def test_batch_completions_beam_search(client):
    raise AssertionError("skipped: see the reason")


@pytest.mark.asyncio
@pytest.mark.parametrize("logprobs_arg", [1, 0])
async def test_echo_logprob_completion(client, tokenizer, logprobs_arg):
    for prompt in ("Hello, my name is", ZEROS):
        completion = await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=5, temperature=0.0, echo=True, logprobs=logprobs_arg
        )
        prompt_text = tokenizer.decode(prompt) if isinstance(prompt, list) else prompt
        assert re.search(r"^" + prompt_text, completion.choices[0].text)
        logprobs = completion.choices[0].logprobs
        assert logprobs is not None
        assert len(logprobs.text_offset) > 5
        assert len(logprobs.token_logprobs) > 5 and logprobs.token_logprobs[0] is None
        assert len(logprobs.top_logprobs) > 5 and logprobs.top_logprobs[0] is None
        for top in logprobs.top_logprobs[1:]:
            assert max(logprobs_arg, 1) <= len(top) <= logprobs_arg + 1
        assert len(logprobs.tokens) > 5


async def refused(client, prompt: str, **extra_body) -> None:
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        await client.completions.create(model=MODEL_NAME, prompt=prompt, extra_body=extra_body)


@pytest.mark.asyncio
async def test_invalid_json_schema(client):
    prompt = "Generate a JSON with the brand, model and car_type ofthe most iconic car from the 90's"
    await refused(client, prompt, structured_outputs={"json": INVALID_JSON_SCHEMA})


@pytest.mark.asyncio
async def test_invalid_regex(client):
    prompt = (
        "Generate an email address for Alan Turing, who works in Enigma.End in .com and new line. Example result:"
        "alan.turing@enigma.com\n"
    )
    await refused(client, prompt, structured_outputs={"regex": r"[.*"}, stop=["\n"])


@pytest.mark.asyncio
async def test_invalid_grammar(client):
    prompt = "Generate an SQL query to show the 'username' and 'email'from the 'users' table."
    await refused(client, prompt, structured_outputs={"grammar": INVALID_SQL_GRAMMAR})
