"""Tool calling: the parsers of app/tool_calls.py (whole and cut at every point, malformed calls left as
text), messages and tools rendered as transformers renders them, and `ringllm serve` through the official
openai client: on a scripted checkpoint whose greedy answer is a Hermes tool call (tests/chat_models.py), and
on the real Qwen2.5-Coder-0.5B-Instruct model (tests/real_model.py) for an agent loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ringllm.app.chat import AnswerParser, ToolPlan, whole_message
from ringllm.app.tool_calls import HermesParser, Llama3JsonParser

CALL = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}'
ARGS = json.dumps({"city": "Paris", "unit": "°C"}, ensure_ascii=False)

PYTHON_TAG_TWO_CALLS = '<|python_tag|>{"name": "a", "parameters": {}};{"name": "b", "parameters": {"x": [1]}}'

# (parser, text, expected content, expected [(name, arguments JSON)])
CASES = [
    (HermesParser, f"<tool_call>\n{CALL}\n</tool_call>", "", [("get_weather", ARGS)]),
    (
        HermesParser,
        f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>{CALL}</tool_call>\n",
        "Let me look.",
        [("get_weather", ARGS), ("get_weather", ARGS)],
    ),
    (HermesParser, "No tools: 1 < 2, <tool is no tag.\n", "No tools: 1 < 2, <tool is no tag.\n", []),
    (HermesParser, "<tool_call>{not json}</tool_call> after", "<tool_call>{not json}</tool_call> after", []),
    (HermesParser, '<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    (HermesParser, f"<tool_call>{CALL}", "", [("get_weather", ARGS)]),  # cut before its closing tag
    (HermesParser, '<tool_call>{"name": "f", "arg', '<tool_call>{"name": "f", "arg', []),
    (HermesParser, '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "", [("f", '{"x": 1}')]),
    (HermesParser, "<tool_ca", "<tool_ca", []),
    (
        Llama3JsonParser,
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "°C"}}',
        "",
        [("get_weather", ARGS)],
    ),
    (Llama3JsonParser, PYTHON_TAG_TWO_CALLS, "", [("a", "{}"), ("b", '{"x": [1]}')]),
    (Llama3JsonParser, "The weather is {mild}.", "The weather is {mild}.", []),
    (Llama3JsonParser, ' {"name": "a", "parameters": {}} tail', ' {"name": "a", "parameters": {}} tail', []),
    (Llama3JsonParser, "Plain answer.", "Plain answer.", []),
]


def run(parser_cls, pieces):
    p = parser_cls()
    content, calls = "", []
    for piece in pieces:
        text, found = p.feed(piece)
        content, calls = content + text, calls + found
    text, found = p.finish()
    return content + text, [(c.name, c.arguments) for c in calls + found]


def splits(text):
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


@pytest.mark.parametrize("parser_cls,text,content,calls", CASES)
def test_parsers_split_at_every_point(parser_cls, text, content, calls):
    for pieces in splits(text):
        assert run(parser_cls, pieces) == (content, calls), pieces


# Hermes answers without the tags (as Qwen2.5-Coder-0.5B writes them), for a request with get_weather
BARE = [
    (CALL, "", [("get_weather", ARGS)]),
    (f"\n{CALL}\n{CALL}", "", [("get_weather", ARGS)] * 2),
    ('{"name": "other_tool", "arguments": {}}', '{"name": "other_tool", "arguments": {}}', []),
    ('{"key": "a JSON answer"} and text', '{"key": "a JSON answer"} and text', []),
    (f'{{"a": 1}}\n<tool_call>{CALL}</tool_call>', '{"a": 1}', [("get_weather", ARGS)]),
    ("Plain text.", "Plain text.", []),
]


@pytest.mark.parametrize("text,content,calls", BARE)
def test_hermes_answers_without_tags(text, content, calls):
    for pieces in splits(text):
        assert run(lambda: HermesParser(["get_weather"]), pieces) == (content, calls), pieces


# Fenced calls, as Qwen2.5-Coder-0.5B wrote 8 of 10 of its calls with tool_choice auto (the request offers
# get_weather): a fence that holds nothing but calls to offered tools is calls, anywhere in the answer.
FENCED = [
    (f"```json\n{CALL}\n```", "", [("get_weather", ARGS)]),
    (f"Sure.\n```json\n{CALL}\n```\n", "Sure.", [("get_weather", ARGS)]),
    (f"```\n[{CALL}, {CALL}]\n```", "", [("get_weather", ARGS)] * 2),
    ("```python\nprint(1)\n```", "```python\nprint(1)\n```", []),
    (
        '```json\n{"name": "other_tool", "arguments": {}}\n```',
        '```json\n{"name": "other_tool", "arguments": {}}\n```',
        [],
    ),
    ("```json\n{unclosed", "```json\n{unclosed", []),
    ("Two `` ticks, one ` tick.", "Two `` ticks, one ` tick.", []),
    # a tagged call to a tool the request did not offer stays text
    (
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        [],
    ),
]


@pytest.mark.parametrize("text,content,calls", FENCED)
def test_hermes_fenced_calls_and_tools_never_offered(text, content, calls):
    for pieces in splits(text):
        assert run(lambda: HermesParser(["get_weather"]), pieces) == (content, calls), pieces


def test_answer_parser_reasoning_then_calls_and_parallel_off():
    block = f"<tool_call>\n{CALL}\n</tool_call>"
    text = f"<think>\nweather?\n</think>\n\n{block}\n{block}"
    for one in (False, True):
        for pieces in splits(text):
            p = AnswerParser("<|im_start|>assistant\n", "qwen3", ToolPlan(parser="hermes", one_call=one))
            msg = whole_message(p, "".join(pieces)) if len(pieces) == 1 else None
            if msg is None:  # stream: reassemble the parts by index
                deltas = [p.feed(x) for x in pieces] + [p.finish()]
                calls: dict[int, list] = {}
                for d in deltas:
                    for part in d.calls:
                        calls.setdefault(part.index, [None, ""])
                        calls[part.index][0] = calls[part.index][0] or part.name
                        calls[part.index][1] += part.arguments
                got = (
                    "".join(d.reasoning for d in deltas),
                    "".join(d.content for d in deltas),
                    [tuple(v) for _, v in sorted(calls.items())],
                )
            else:
                got = (
                    msg.reasoning_content,
                    msg.content,
                    [(c.function.name, c.function.arguments) for c in msg.tool_calls],
                )
            assert got[0] == "\nweather?\n" and not got[1], pieces
            assert got[2] == [("get_weather", ARGS)] * (1 if one else 2), pieces


def test_forced_calls():
    named = AnswerParser("", None, ToolPlan(forced="get_weather"))
    first, rest = named.feed('{"city": '), named.feed('"Paris"}')
    assert first.calls[0].name == "get_weather" and first.calls[0].id.startswith("call_")
    assert first.calls[0].arguments + rest.calls[0].arguments == '{"city": "Paris"}' and not named.finish()
    required = AnswerParser("", None, ToolPlan(forced="required"))
    msg = whole_message(required, '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]')
    got = [(c.function.name, c.function.arguments) for c in msg.tool_calls]
    assert got == [("a", '{"x": 1}'), ("b", "{}")]
    assert msg.content is None
    cut = whole_message(AnswerParser("", None, ToolPlan(forced="required")), '[{"name": "a", "param')
    assert cut.content == '[{"name": "a", "param' and cut.tool_calls is None


# ---- messages and tools reach the template as transformers gives them ----
# Qwen2.5-Instruct's chat template (the tools part as Qwen ships it; the default system prompt shortened).
QWEN25_TEMPLATE = (Path(__file__).parent / "data" / "qwen2.5-tools.jinja").read_text()

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
CONVERSATION = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}]},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Oslo?"}], "name": "ann"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 °C"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "<cloudy>, 9 °C"}]},
]


def test_messages_and_tools_render_as_transformers_renders_them(tmp_path):
    import msgspec
    from transformers import AutoTokenizer

    from ringllm.app.chat import template_messages
    from ringllm.app.schemas import Message
    from ringllm.text.tokenizer import Tokenizer
    from tests.chat_models import scripted_checkpoint

    path = scripted_checkpoint(tmp_path / "m", ["\n", "<|im_end|>"], QWEN25_TEMPLATE)
    messages = template_messages(msgspec.convert(CONVERSATION, list[Message]))
    ours = Tokenizer(path).apply_chat_template(messages, TOOLS)
    # What a transformers user writes for the same conversation: text contents, arguments as objects.
    theirs = [dict(m) for m in CONVERSATION]
    theirs[0]["content"], theirs[1]["content"] = "Be brief.\nUse tools.", "Weather in Paris and Oslo?"
    theirs[4]["content"] = "<cloudy>, 9 °C"
    theirs[2]["tool_calls"] = [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in theirs[2]["tool_calls"]
    ]
    expected = AutoTokenizer.from_pretrained(path).apply_chat_template(
        theirs, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours == expected
    assert "'sunny' or <cloudy> & so on" in ours and '"arguments": {"city": "Oslo"}' in ours


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
        ({"messages": [{"role": "user", "content": "x", "cache": True}]}, None),
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


# ---- the real Qwen2.5-Coder-0.5B-Instruct (GGUF, ~5 tokens/s here): one server, few and short answers ----
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
PARIS = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def real(real_model, tmp_path_factory):
    from openai import OpenAI

    from tests.helpers import start_server, stop_server

    cache = tmp_path_factory.mktemp("tools-real")
    proc, base = start_server(cache, "--model", str(real_model), "--served-model-name", "q")
    try:
        yield OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def first_turn(real):
    """The model's answer to PARIS with the weather tool, tool_choice auto, greedy (shared by the tests)."""
    return real.chat.completions.create(model="q", messages=PARIS, tools=WEATHER, max_tokens=32, temperature=0)


def test_real_model_calls_the_tool(first_turn):
    choice = first_turn.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_real_model_agent_loop_completes(real, first_turn):
    """user -> tool call -> tool result -> final answer. This small model, asked with the tools still on
    offer, calls the tool again; the final turn is asked with tool_choice "none", as an agent does when it
    wants the answer."""
    msg = first_turn.choices[0].message
    messages = PARIS + [
        msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "Sunny, 21 °C."},
    ]
    final = real.chat.completions.create(
        model="q", messages=messages, tools=WEATHER, tool_choice="none", max_tokens=12, temperature=0
    )
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")
    alone = real.chat.completions.create(
        model="q", messages=PARIS, tools=WEATHER, tool_choice="none", max_tokens=1, temperature=0
    )
    assert final.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result were in


def test_real_model_streamed_call_is_the_same_call(real, first_turn):
    whole = first_turn.choices[0].message.tool_calls[0]
    chunks = list(
        real.chat.completions.create(
            model="q", messages=PARIS, tools=WEATHER, max_tokens=32, temperature=0, stream=True
        )
    )
    parts = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert parts and parts[0].function.name == whole.function.name and parts[0].id
    assert "".join(p.function.arguments or "" for p in parts) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


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
    assert reason == "tool_calls"


def test_served_required_tool_choice_gives_valid_calls(served):
    client, _ = served
    r = ask(client, tools=CITY_ONLY, tool_choice="required", parallel_tool_calls=False, max_tokens=120)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    args = json.loads(call.function.arguments)
    assert args == {} if call.function.name == "get_time" else args["city"] in ("Paris", "Oslo")
    assert r.choices[0].finish_reason == "tool_calls"


def test_real_model_agent_loop_with_tool_choice_required(real):
    r = real.chat.completions.create(
        model="q", messages=PARIS, tools=WEATHER, tool_choice="required", max_tokens=40, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    messages = PARIS + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 °C."},
    ]
    final = real.chat.completions.create(
        model="q", messages=messages, tools=WEATHER, tool_choice="none", max_tokens=12, temperature=0
    )
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None


def test_real_model_parse_with_a_pydantic_model(real):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str

    ask = [{"role": "user", "content": "Give the name and country of Paris as JSON."}]
    r = real.chat.completions.parse(model="q", messages=ask, response_format=City, max_tokens=40, temperature=0)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name and city.country


def test_parsers_by_family_template_or_flag(tmp_path):
    from ringllm.app.chat import model_parsers

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert model_parsers(str(tmp_path), None, None, None) == ("hermes", "qwen3")
    assert model_parsers(str(tmp_path), None, "llama3_json", "none") == ("llama3_json", None)
    gguf = str(tmp_path / "model.gguf")  # no config.json next to it: the template tells
    assert model_parsers(gguf, QWEN25_TEMPLATE, "", "") == ("hermes", None)
    assert model_parsers(gguf, "{{ '<|python_tag|>' }}", None, None) == ("llama3_json", None)
    assert model_parsers(gguf, "plain", None, "deepseek_r1") == (None, "deepseek_r1")
    with pytest.raises(ValueError, match="--tool-call-parser"):
        model_parsers(gguf, None, "pythonic", None)


def test_tool_plan_without_a_parser_is_a_400():
    import msgspec

    from ringllm.app.chat import tool_plan
    from ringllm.app.errors import ApiError
    from ringllm.app.schemas import ChatRequest

    body = msgspec.convert({"messages": USER, "tools": TOOLS}, ChatRequest)
    with pytest.raises(ApiError, match="--tool-call-parser"):
        tool_plan(body, None)
    assert tool_plan(msgspec.structs.replace(body, tool_choice="none"), None).template_tools is None


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
