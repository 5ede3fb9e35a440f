"""Tool calls (app/tool_calls.py, app/chat.py): the parsers whole and cut at every point, malformed calls left
as text, JSON nested past Python's recursion limit (issue 28, minor) text or a 400 and never a RecursionError
(a 500 that loses the answer); messages and tools rendered as transformers renders them; the parser chosen by
model family, template or flag, and a tool plan without a parser a 400."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from ringllm.app.chat import AnswerParser, ToolPlan, template_messages, whole_message
from ringllm.app.errors import ApiError
from ringllm.app.schemas import Message
from ringllm.app.tool_calls import HermesParser, Llama3JsonParser, make_parser

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    "kind,answer",
    [
        ("hermes", '<tool_call>{"name": "f", "arguments": ' + DEEP + "}</tool_call>"),
        ("hermes", '<tool_call>{"name": "f", "arguments": "' + DEEP + '"}</tool_call>'),
        ("llama3_json", '{"name": "f", "parameters": ' + DEEP + "}"),
    ],
)
def test_deeply_nested_call_json_stays_text(kind, answer):
    parser = make_parser(kind, ["f"])
    text, calls = parser.feed(answer)
    rest, more = parser.finish()
    assert calls == more == [] and text + rest == answer  # the answer is kept, as text


def test_deeply_nested_message_arguments_are_a_400():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP}}
    messages = [msgspec.convert({"role": "assistant", "content": None, "tool_calls": [call]}, Message)]
    with pytest.raises(ApiError) as e:
        template_messages(messages)
    assert e.value.status == 400 and "messages[0].tool_calls[0].function.arguments" in str(e.value)


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


USER = [{"role": "user", "content": "Weather in Paris?"}]


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
