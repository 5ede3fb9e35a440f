"""Tool calling through `ringllm serve` and the official openai client, on a scripted checkpoint whose greedy
answer is a Hermes tool call (tests/chat_models.py): whole and streamed calls, tool_choice none / named /
required, agent-loop messages going back, bad messages and tools as 400s, the client's stream and parse helpers.
The parsers alone: tests/app/test_tool_calls.py; the real model's agent loop: tests/e2e/test_real_model.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# ---- messages and tools reach the template as transformers gives them ----
# Qwen2.5-Instruct's chat template (the tools part as Qwen ships it; the default system prompt shortened).
QWEN25_TEMPLATE = (Path(__file__).parents[1] / "data" / "qwen2.5-tools.jinja").read_text()

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city, as 'sunny' or <cloudy> & so on",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["°C", "°F"]}},
                "required": ["city"],
            },
        },
    }
]


# ---- served: a checkpoint whose greedy answer is 'On<tool_call>\n{get_weather Paris}\n</tool_call>' ----
SCRIPTED_CALL = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
SCRIPT = ["\n", "O", "n", "<tool_call>", SCRIPTED_CALL, "</tool_call>", "<|im_end|>"]
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from openai import OpenAI

    from tests.chat_models import scripted_checkpoint
    from tests.helpers import start_server, stop_server

    cache = tmp_path_factory.mktemp("tools")
    path = scripted_checkpoint(cache / "qwen-tools", SCRIPT, QWEN25_TEMPLATE)
    proc, base = start_server(cache, "--model", str(path), "--served-model-name", "m")
    try:
        yield OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0), base
    finally:
        stop_server(proc)


def ask(client, **kw):
    return client.chat.completions.create(
        model="m",
        messages=kw.pop("messages", USER),
        max_tokens=kw.pop("max_tokens", 16),
        temperature=0,
        tools=kw.pop("tools", TOOLS),
        **kw,
    )


def test_served_tool_call(served):
    client, _ = served
    r = ask(client)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "On"
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function",
        "get_weather",
        {"city": "Paris"},
    )
    assert call.id.startswith("call_")


def test_served_streamed_tool_call_reassembles_into_the_same_call(served):
    client, _ = served
    whole = ask(client).choices[0].message.tool_calls[0]
    chunks = list(ask(client, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert all(len(d.tool_calls or []) <= 1 for d in deltas)  # the name, then the arguments, each a chunk
    parts = [t for d in deltas for t in d.tool_calls or []]
    assert parts[0].id and parts[0].type == "function" and parts[0].function.name == "get_weather"
    assert {p.index for p in parts} == {0} and all(p.id is None for p in parts[1:])
    arguments = "".join(p.function.arguments or "" for p in parts)
    assert parts[0].function.name == whole.function.name
    assert json.loads(arguments) == json.loads(whole.function.arguments)
    assert "".join(d.content or "" for d in deltas) == "On"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_served_tool_choice_none_answers_in_text_without_the_tools(served):
    client, _ = served
    shown, hidden = ask(client), ask(client, tool_choice="none")
    assert hidden.choices[0].message.tool_calls is None and hidden.choices[0].finish_reason == "stop"
    assert hidden.choices[0].message.content == "On<tool_call>" + SCRIPTED_CALL + "</tool_call>"
    assert hidden.usage.prompt_tokens < shown.usage.prompt_tokens  # the tools were not in the prompt


def test_served_agent_loop_messages(served):
    """The assistant's tool call and the tool's result go back in; the template gets them (it renders the
    arguments with tojson, which needs them decoded)."""
    client, _ = served
    first = ask(client).choices[0].message
    messages = USER + [
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny"},
    ]
    r = ask(client, messages=messages)
    assert r.usage.prompt_tokens > ask(client).usage.prompt_tokens
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"  # the script does not change


def test_served_answer_messages_go_back_as_the_client_got_them(served):
    """An assistant message as OpenAI's client holds it (refusal, annotations, audio and function_call null)
    is accepted; a refusal's text is the turn's content."""
    client, _ = served
    echoed = {
        "role": "assistant",
        "content": None,
        "refusal": "I cannot.",
        "annotations": [],
        "audio": None,
        "function_call": None,
    }
    plain = {"role": "assistant", "content": "I cannot."}
    a = ask(client, messages=USER + [echoed] + USER, tool_choice="none", max_tokens=1)
    b = ask(client, messages=USER + [plain] + USER, tool_choice="none", max_tokens=1)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_served_developer_role_is_a_system_message_for_templates_without_it(served):
    _, base = served
    import httpx

    def prompt_tokens(messages):
        body = {"model": "m", "messages": messages, "max_tokens": 1}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        return r.json()["usage"]["prompt_tokens"]

    rule = [{"role": "system", "content": "Answer in French."}]
    as_developer = [{"role": "developer", "content": "Answer in French."}]
    assert prompt_tokens(as_developer + USER) == prompt_tokens(rule + USER) > prompt_tokens(USER)


@pytest.mark.parametrize(
    "change,param",
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"messages": [{"role": "assistant", "content": "x", "function_call": {"name": "f", "arguments": "{}"}}]},
            None,
        ),  # msgspec names the field in the message: "... at `$.messages[0].function_call`"
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
    ],
)
def test_served_bad_messages_and_tools_are_400(served, change, param):
    import httpx

    _, base = served
    body = {"model": "m", "messages": USER, "tools": TOOLS, "max_tokens": 4, **change}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    if param is None:
        assert "messages[0]" in error["message"]
        assert "function_call" in error["message"] or "cache" in error["message"]
    else:
        assert error["param"] == param
    if "image_url" in json.dumps(change):
        assert "'image_url'" in r.json()["error"]["message"]


# ---- tool_choice "required" and a named function: the output is constrained to valid calls ----
CITY = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Oslo"]}},
    "required": ["city"],
    "additionalProperties": False,
}  # an enum keeps a scripted model's constrained output short
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
CITY_ONLY = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "get_time", "parameters": NO_ARGUMENTS}},
]


@pytest.mark.parametrize("stream", [False, True])
def test_served_named_tool_choice_always_gives_that_call(served, stream):
    client, _ = served
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = ask(client, tools=CITY_ONLY, tool_choice=choice, max_tokens=80, stream=stream)
    if stream:
        chunks = list(r)
        parts = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
        name, arguments = parts[0].function.name, "".join(p.function.arguments or "" for p in parts)
        reason = chunks[-1].choices[0].finish_reason
    else:
        [call] = r.choices[0].message.tool_calls
        name, arguments, reason = call.function.name, call.function.arguments, r.choices[0].finish_reason
    assert name == "get_weather" and json.loads(arguments)["city"] in ("Paris", "Oslo")
    assert reason == "stop"  # a named function's call was forced: OpenAI and vLLM end it with "stop"


def test_served_required_tool_choice_gives_valid_calls(served):
    client, _ = served
    r = ask(client, tools=CITY_ONLY, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    assert args == {} if call.function.name == "get_time" else args["city"] in ("Paris", "Oslo")
    assert r.choices[0].finish_reason == "tool_calls"


def test_served_openai_stream_helper_and_pydantic_tools(served):
    """The official client's helpers: chat.completions.stream() accumulates the streamed call, and parse()
    with a Pydantic function tool (strict) returns its arguments as that model."""
    import openai
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: str

    client, _ = served
    tool = openai.pydantic_function_tool(GetWeather, name="get_weather")
    with client.chat.completions.stream(model="m", messages=USER, tools=[tool], max_tokens=16, temperature=0) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.parsed_arguments == GetWeather(city="Paris")
    parsed = client.chat.completions.parse(model="m", messages=USER, tools=[tool], max_tokens=16, temperature=0)
    assert parsed.choices[0].message.tool_calls[0].function.parsed_arguments == GetWeather(city="Paris")
