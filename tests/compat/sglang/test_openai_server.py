"""SGLang's OpenAI-server tests (sgl-project/sglang, test/srt/openai_server/), re-expressed against `ringllm serve`
on the suite's real model: the requests and checks of the files named in each section, with generation lengths cut
for the CPU box. Not in CI (marker `sglang_compat`, deselected by default): `pytest -m sglang_compat
tests/compat/sglang`. Results and what was left out: tests/compat/sglang/STATUS.md.

SGLang starts its servers with an API key; the shared default server here has none (the key's handling is covered
by tests/compat/vllm/test_optional_middleware.py)."""

from __future__ import annotations

import itertools
import json
import re

import httpx
import openai
import pytest

from tests.compat.vllm.utils import MODEL_NAME

pytestmark = pytest.mark.sglang_compat

PROMPT = "The capital of France is"
IM_END = 151645  # the model's end-of-turn token (<|im_end|>); SGLang's test names Llama 3's 128009


@pytest.fixture(scope="module")
def client(default_server) -> openai.OpenAI:
    return default_server.get_client()


# ---- basic/test_openai_server.py: TestOpenAIServer ----
COMPLETION_MATRIX = list(itertools.product([False, True], [None, 5], [True, False], [1, 2], [False, True]))
MATRIX_IDS = [f"echo={e}-logprobs={lp}-list={li}-n={n}-ids={t}" for e, lp, li, n, t in COMPLETION_MATRIX]


def completion_prompt(tokenizer, use_list: bool, token_input: bool):
    one = tokenizer.encode(PROMPT) if token_input else PROMPT
    return ([one, one] if use_list else one), (2 if use_list else 1) * len(tokenizer.encode(PROMPT))


@pytest.mark.parametrize("echo, logprobs, use_list, n, token_input", COMPLETION_MATRIX, ids=MATRIX_IDS)
def test_completion(client, tokenizer, echo, logprobs, use_list, n, token_input):
    prompt, prompt_tokens = completion_prompt(tokenizer, use_list, token_input)
    # max_tokens 32 -> 4 (CPU); the checks are on the response's shape
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=4, echo=echo, logprobs=logprobs, n=n
    )
    assert len(r.choices) == (2 if use_list else 1) * n
    if echo:
        assert r.choices[0].text.startswith(PROMPT)
    if logprobs:
        lp = r.choices[0].logprobs
        assert isinstance(lp.tokens[0], str)
        assert isinstance(lp.top_logprobs[1], dict) and len(lp.top_logprobs[1]) > 0
        if not echo:
            assert lp.token_logprobs[0]
    assert r.id and r.created
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens > 0


@pytest.mark.parametrize("echo, logprobs, use_list, n, token_input", COMPLETION_MATRIX, ids=MATRIX_IDS)
def test_completion_stream(client, tokenizer, echo, logprobs, use_list, n, token_input):
    prompt, _ = completion_prompt(tokenizer, use_list, token_input)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        temperature=0,
        max_tokens=4,
        echo=echo,
        logprobs=logprobs,
        stream=True,
        stream_options={"include_usage": True},
        n=n,
    )
    firsts: dict[int, bool] = {}
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.usage.prompt_tokens > 0 and chunk.usage.completion_tokens > 0
            continue
        index = chunk.choices[0].index
        first = firsts.get(index, True)
        if logprobs:
            lp = chunk.choices[0].logprobs
            assert lp and isinstance(lp.tokens[0], str)
            if not (first and echo):
                assert isinstance(lp.top_logprobs[0], dict) and len(lp.top_logprobs[0]) > 0
        if first:
            if echo:
                assert chunk.choices[0].text.startswith(PROMPT), chunk.choices[0].text
            firsts[index] = False
        assert chunk.id and chunk.created
    assert all(not firsts.get(i, True) for i in range((2 if use_list else 1) * n))


CAPITAL = [
    {"role": "system", "content": "You are a helpful AI assistant"},
    {"role": "user", "content": "What is the capital of France? Answer in a few words."},
]


@pytest.mark.parametrize("logprobs, n", list(itertools.product([None, 5], [1, 2])))
def test_chat_completion(client, logprobs, n):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CAPITAL,
        temperature=0,
        logprobs=logprobs is not None and logprobs > 0,
        top_logprobs=logprobs,
        n=n,
        max_tokens=8,  # SGLang's has no limit
    )
    if logprobs:
        top = r.choices[0].logprobs.content[0].top_logprobs
        assert isinstance(top[0].token, str) and len(top) == logprobs
    assert len(r.choices) == n
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.id and r.created
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0 and r.usage.total_tokens > 0


@pytest.mark.parametrize("logprobs, n", list(itertools.product([None, 5], [1, 2])))
def test_chat_completion_stream(client, logprobs, n):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CAPITAL,
        temperature=0,
        logprobs=logprobs is not None and logprobs > 0,
        top_logprobs=logprobs,
        stream=True,
        stream_options={"include_usage": True},
        n=n,
        max_tokens=8,
    )
    firsts: dict[int, bool] = {}
    finished: dict[int, int] = {}
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.usage.prompt_tokens > 0 and chunk.usage.completion_tokens > 0
            continue
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            finished[choice.index] = finished.get(choice.index, 0) + 1
        if firsts.get(choice.index, True):  # the first chunk of each choice says the role
            assert choice.delta.role == "assistant"
            firsts[choice.index] = False
            continue
        if logprobs and choice.finish_reason is None:
            top = choice.logprobs.content[0].top_logprobs
            assert isinstance(top[0].token, str) and len(top) == logprobs
        assert isinstance(choice.delta.content, str) or choice.finish_reason
    assert all(finished.get(i) == 1 for i in range(n)), finished


def test_regex(client):
    """SGLang's top-level `regex` field."""
    regex = r"""\{\n   "name": "[\w]+",\n   "population": [\d]+\n\}"""
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "system", "content": "You are a helpful AI assistant"},
            {"role": "user", "content": "Introduce the capital of France."},
        ],
        temperature=0,
        max_tokens=64,  # 128 in SGLang's
        extra_body={"regex": regex},
    )
    obj = json.loads(r.choices[0].message.content)
    assert isinstance(obj["name"], str) and isinstance(obj["population"], int)


def test_penalty(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Introduce the capital of France."}],
        temperature=0,
        max_tokens=8,
        frequency_penalty=1.0,
    )
    assert isinstance(r.choices[0].message.content, str)


def test_response_prefill(client):
    """continue_final_message: the answer goes on from the assistant turn's start."""
    description = (
        "The SmartHome Mini is a compact smart home assistant available in black or white for only $49.99. At just "
        "5 inches wide, it lets you control lights, thermostats, and other connected devices via voice or app—no "
        "matter where you place it in your home. This affordable little hub brings convenient hands-free control "
        "to your smart devices."
    )
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            {"role": "system", "content": "You are a helpful AI assistant"},
            {
                "role": "user",
                "content": "Extract the name, size, price, and color from this product description as a JSON "
                f"object:\n\n<description>\n{description}\n</description>\n",
            },
            {"role": "assistant", "content": "{\n"},
        ],
        temperature=0,
        max_tokens=16,
        extra_body={"continue_final_message": True},
    )
    assert r.choices[0].message.content.strip().startswith('"name": "SmartHome Mini",')


def test_model_list(client):
    models = list(client.models.list())
    assert len(models) == 1
    assert isinstance(getattr(models[0], "max_model_len", None), int)


def test_retrieve_model(client, real_model):
    model = client.models.retrieve(MODEL_NAME)
    assert model.id == MODEL_NAME
    assert model.root == real_model.name  # SGLang's root is the model as given; ringllm's, its name, never a path
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("non-existent-model")


# ---- features/test_cache_report.py ----
def test_cache_report_openai(client):
    """A repeated chat prompt reports all its tokens but the last as cached."""
    message = "€ This is a very long and unique text that should not be already cached, the twist is that it"
    body = dict(model=MODEL_NAME, messages=[{"role": "user", "content": message}], temperature=0, max_tokens=1)
    client.chat.completions.create(**body)
    r = client.chat.completions.create(**body)
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens - 1


def test_cache_salt_effectiveness(client):
    """`cache_salt`: requests with different salts share no cache."""
    body = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of Japan?"}], max_tokens=1)
    first = client.chat.completions.create(**body, extra_body={"cache_salt": "salt1"})
    second = client.chat.completions.create(**body, extra_body={"cache_salt": "salt1"})
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens - 1
    other = client.chat.completions.create(**body, extra_body={"cache_salt": "salt2"})
    assert other.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens


# ---- features/test_continuous_usage_stats.py ----
def test_continuous_usage_stats_enabled(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "What is machine learning?"}],
        stream=True,
        max_tokens=8,
        temperature=0,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    with_usage = with_content = 0
    last = None
    for chunk in stream:
        if chunk.usage:
            with_usage += 1
            last = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            with_content += 1
    assert with_content > 0 and with_usage >= with_content
    assert last.total_tokens == last.prompt_tokens + last.completion_tokens


def test_continuous_usage_stats_disabled(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "What is AI?"}],
        stream=True,
        max_tokens=8,
        temperature=0,
        stream_options={"include_usage": True, "continuous_usage_stats": False},
    )
    usage_chunks = [c for c in stream if c.usage]
    assert len(usage_chunks) == 1 and len(usage_chunks[0].choices) == 0


# ---- features/test_openai_server_ebnf.py ----
@pytest.mark.parametrize(
    "grammar, pattern, ask",
    [
        (r'root ::= "Hello" | "Hi" | "Hey"', r"^(Hello|Hi|Hey)[.!?]*\s*$", "Say a greeting (Hello, Hi, or Hey)."),
        (
            'root ::= "{" pair "}"\npair ::= "\\"name\\"" ":" string\nstring ::= "\\"" [A-Za-z]+ "\\""',
            r'^\{"name":"[A-Za-z]+"\}$',
            "Generate single key JSON with only letters.",
        ),
    ],
    ids=["greeting", "strict-json"],
)
def test_ebnf(client, grammar, pattern, ask):
    """SGLang's top-level `ebnf` field."""
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": ask}],
        temperature=0,
        max_tokens=32,
        extra_body={"ebnf": grammar},
    )
    assert re.match(pattern, r.choices[0].message.content.strip())


# ---- validation/test_matched_stop.py ----
STORY = "Please write an extremely detailed and vivid fantasy story, at least 3,000 words long."


def matched(default_server, route: str, **body) -> dict:
    payload = {"model": MODEL_NAME, "temperature": 0, "top_p": 1, **body}
    if route == "v1/completions":
        payload["prompt"] = STORY
    else:
        payload["messages"] = [{"role": "user", "content": STORY}]
    r = httpx.post(default_server.url_for(route), json=payload, timeout=600)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("route", ["v1/completions", "v1/chat/completions"])
def test_matched_stop(default_server, route):
    """`matched_stop`: the stop string, or the stop token id, that ended the choice (null for length)."""
    choice = matched(default_server, route, max_tokens=64, stop="\n")  # 1000 in SGLang's
    assert (choice["finish_reason"], choice["matched_stop"]) == ("stop", "\n")
    choice = matched(default_server, route, max_tokens=5)
    assert choice["finish_reason"] == "length" and choice["matched_stop"] is None
    if route == "v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "What is 2 + 2? One word."}], "max_tokens": 16}
        r = httpx.post(default_server.url_for(route), json={"model": MODEL_NAME, "temperature": 0, **body}, timeout=600)
        choice = r.json()["choices"][0]
        assert (choice["finish_reason"], choice["matched_stop"]) == ("stop", IM_END)


@pytest.mark.parametrize("route", ["v1/completions", "v1/chat/completions"])
def test_stop_regex(default_server, route):
    """SGLang's `stop_regex` field."""
    choice = matched(default_server, route, max_tokens=64, stop_regex=r"and|or")
    assert (choice["finish_reason"], choice["matched_stop"]) == ("stop", r"and|or")


# ---- validation/test_request_length_validation.py (its 1000-token context scaled to the server's 8192) ----
def test_input_length_longer_than_context_length(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hello " * 9000}], temperature=0
        )
    assert "is longer than the model's context length" in str(e.value)


def test_max_tokens_validation(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hello "}], temperature=0, max_tokens=9000
        )
    assert "Requested token count exceeds the model's maximum context" in str(e.value)


# ---- function_call/test_tool_choice.py (SGLang runs Llama-3.2-1B with the llama3 parser; hermes here) ----
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "use this to get latest weather information for a city given its name",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "name of the city to get weather for"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_pokemon_info",
            "description": "get detailed information about a pokemon given its name",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string", "description": "name of the pokemon to get info for"}},
                "required": ["name"],
            },
        },
    },
]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in the 5 most populated cities in the US?"}]


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice(client, tool_choice, stream):
    body = dict(model=MODEL_NAME, messages=WEATHER_QUESTION, tools=TOOLS, tool_choice=tool_choice, max_tokens=100)
    if not stream:
        calls = client.chat.completions.create(**body).choices[0].message.tool_calls
        assert calls
        names = {c.function.name for c in calls}
    else:
        deltas = [
            d
            for c in client.chat.completions.create(**body, stream=True)
            for d in (c.choices[0].delta.tool_calls or [])
        ]
        assert deltas
        names = {d.function.name for d in deltas if d.function and d.function.name}
    if isinstance(tool_choice, dict):
        assert names == {"get_weather"}
