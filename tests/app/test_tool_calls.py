"""app/tool_calls.py and the tool calls of chat messages (app/chat.py): JSON nested past Python's recursion limit
(issue 28, minor) is text or a 400, never a RecursionError (a 500 that loses the answer)."""

import msgspec
import pytest

from ringllm.app.chat import template_messages
from ringllm.app.errors import ApiError
from ringllm.app.schemas import Message
from ringllm.app.tool_calls import make_parser

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
