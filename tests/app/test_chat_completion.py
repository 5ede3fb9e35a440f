"""/v1/chat/completions' serving object over a scripted engine: the prompt the template makes, answers whole
and streamed, tool calls, reasoning, logprobs, n, stop strings and errors naming their field."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from ringllm.app import chat as chat_io
from ringllm.app.errors import ApiError
from ringllm.app.responses import PromptLogprob
from ringllm.app.schemas import ChatRequest, Message
from ringllm.app.settings import SamplingDefaults
from ringllm.text.chat_template import chat_prompt_ids
from tests.app.conftest import collect_frames, never
from tests.app.fake_engine import LOGPROB, PROMPT_LOGPROB, PROMPT_RANK

USER = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def body(**fields) -> ChatRequest:
    return msgspec.json.decode(msgspec.json.encode({"model": "m", "messages": USER, **fields}), type=ChatRequest)


def create(serving, **fields):
    return asyncio.run(serving.chat.create(body(**fields), "req1", never))


def stream(serving, **fields) -> list:
    async def run():
        return await collect_frames(await serving.chat.create(body(stream=True, **fields), "req1", never))

    return asyncio.run(run())


def test_the_prompt_is_the_templates_text_and_the_answer_its_message(serving):
    tok = serving.model.tokenizer
    serving.engine.reply = serving.engine.text_reply("It is sunny.")
    r = create(serving)
    want = chat_prompt_ids(tok, chat_io.template_messages(msgspec.convert(USER, list[Message])))
    [(_, ids, sampling)] = serving.engine.submitted
    assert ids == want and sampling.max_tokens == serving.model.max_seq_len - len(
        want
    )  # no max_tokens: what the context has left
    assert r.id == "chatcmpl-req1" and r.object == "chat.completion"
    [choice] = r.choices
    assert choice.message.role == "assistant" and choice.message.content == "It is sunny."
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert r.usage.prompt_tokens == len(want) and r.usage.completion_tokens == len(tok.encode("It is sunny."))


def test_max_completion_tokens_wins_over_max_tokens(serving):
    create(serving, max_tokens=9, max_completion_tokens=3)
    assert serving.engine.submitted[0][2].max_tokens == 3


def test_the_stream_opens_each_choice_then_streams_its_content(serving):
    serving.engine.reply = serving.engine.text_reply("It is sunny.")
    whole = create(serving, n=2)
    frames = stream(serving, n=2, stream_options={"include_usage": True})
    assert frames[-1] == "[DONE]" and frames[-2]["usage"]["completion_tokens"] == whole.usage.completion_tokens
    # as vLLM and SGLang: each choice opens with a chunk of its own (clients read choices[0])
    assert [f["choices"] for f in frames[:2]] == [
        [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]
        for i in (0, 1)
    ]
    for index in (0, 1):
        chunks = [c for f in frames[2:-2] for c in f["choices"] if c["index"] == index]
        assert "".join(c["delta"].get("content") or "" for c in chunks) == whole.choices[index].message.content
        assert [c["finish_reason"] for c in chunks][-1] == "stop"


def test_a_tool_call_comes_back_as_tool_calls(serving):
    serving.engine.reply = serving.engine.text_reply("On it." + CALL)
    choice = create(serving, tools=TOOLS).choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert call.id and call.type == "function" and choice.message.content == "On it."
    assert choice.finish_reason == "tool_calls"
    frames = stream(serving, tools=TOOLS)
    deltas = [c["delta"] for f in frames[1:-1] for c in f["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["type"] == "function" and calls[0]["index"] == 0
    assert json.loads("".join(c["function"].get("arguments") or "" for c in calls)) == {"city": "Paris"}
    assert frames[-2]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_required_constrains_the_output(serving):
    serving.engine.reply = serving.engine.text_reply('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    [call] = create(serving, tools=TOOLS, tool_choice="required").choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    constraint = serving.engine.submitted[0][2].structured_outputs
    assert constraint.disable_any_whitespace and json.loads(constraint.json)["type"] == "array"
    with pytest.raises(ApiError) as e:
        create(serving, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    assert e.value.param == "tool_choice"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_forced_call_ends_with_stop_for_a_named_function_and_tool_calls_for_required(serving, streamed):
    """OpenAI and vLLM: "tool_calls" for tool_choice auto and required, "stop" for a named function."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    replies = [
        ('{"city": "Oslo"}', named, "stop"),
        ('[{"name": "get_weather", "parameters": {}}]', "required", "tool_calls"),
    ]
    for reply, choice, reason in replies:
        serving.engine.reply = serving.engine.text_reply(reply)
        if streamed:
            assert stream(serving, tools=TOOLS, tool_choice=choice)[-2]["choices"][0]["finish_reason"] == reason
        else:
            assert create(serving, tools=TOOLS, tool_choice=choice).choices[0].finish_reason == reason


def test_reasoning_comes_back_apart_from_the_answer(build):
    serving = build(parsers=(None, "qwen3"))
    serving.engine.reply = serving.engine.text_reply("<think>Paris is in France.</think>\n\nSunny.")
    message = create(serving).choices[0].message
    assert (message.reasoning_content, message.content) == ("Paris is in France.", "Sunny.")
    deltas = [c["delta"] for f in stream(serving)[1:-1] for c in f["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Paris is in France."
    assert "".join(d.get("content") or "" for d in deltas) == "Sunny."


def test_logprobs_carry_each_tokens_bytes_and_top_alternatives(serving):
    tok = serving.model.tokenizer
    serving.engine.reply = serving.engine.text_reply("café")
    content = create(serving, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    ids = tok.encode("café")
    assert [c.token for c in content] == [tok.decode([t]) for t in ids] and all(c.logprob == LOGPROB for c in content)
    assert [c.bytes for c in content] == [list(tok.decode([t]).encode()) for t in ids]
    assert [len(c.top_logprobs) for c in content] == [2] * len(ids)
    assert serving.engine.submitted[0][2].logprobs == 2
    chunks = [c for f in stream(serving, logprobs=True)[1:-1] for c in f["choices"]]
    assert sum(len(c["logprobs"]["content"]) for c in chunks if c["logprobs"]) == len(ids)


def test_top_logprobs_0_gives_each_token_its_logprob_and_no_alternatives(serving):
    content = create(serving, logprobs=True, top_logprobs=0).choices[0].logprobs.content
    assert content and all(c.logprob == LOGPROB and c.top_logprobs == [] for c in content)


def test_prompt_logprobs_come_once_for_the_conversation(serving):
    """vLLM's chat answer carries prompt_logprobs beside its choices (one prompt for all n)."""
    tok = serving.model.tokenizer
    r = create(serving, prompt_logprobs=0, n=2, max_tokens=2)
    [(_, ids, sampling), _] = serving.engine.submitted
    assert sampling.prompt_logprobs == 0
    assert r.prompt_logprobs == [None] + [
        {t: PromptLogprob(PROMPT_LOGPROB, PROMPT_RANK, tok.decode([t], skip_special_tokens=False))} for t in ids[1:]
    ]
    assert json.loads(msgspec.json.encode(create(serving, max_tokens=2)))["prompt_logprobs"] is None  # as vLLM
    with pytest.raises(ApiError) as e:
        stream(serving, prompt_logprobs=0)
    assert e.value.param == "prompt_logprobs"


def test_truncate_prompt_tokens_cuts_the_templates_tokens(serving):
    create(serving, max_tokens=2)
    whole = serving.engine.submitted[-1][1]
    r = create(serving, max_tokens=2, truncate_prompt_tokens=5)
    assert serving.engine.submitted[-1][1] == whole[-5:] and r.usage.prompt_tokens == 5
    long = [{"role": "user", "content": "x " * 3000}]  # past the context, unless truncated
    create(serving, messages=long, truncate_prompt_tokens=-1)  # no max_tokens: one token of room is kept
    assert len(serving.engine.submitted[-1][1]) == serving.model.max_seq_len - 1


def test_a_stop_string_ends_a_streamed_choice_and_aborts_it(serving):
    serving.engine.reply = serving.engine.text_reply("It is sunny in Paris today.", hang=True)
    frames = stream(serving, stop="Paris")
    assert "".join(c["delta"].get("content") or "" for f in frames[1:-1] for c in f["choices"]) == "It is sunny in "
    assert frames[-2]["choices"][0]["finish_reason"] == "stop" and serving.engine.aborted == ["fake-0"]


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
        ({"messages": [{"role": "user", "content": "x " * 3000}]}, "messages"),  # past the context
        ({"max_tokens": 1020}, "max_tokens"),
        ({"logit_bias": {"4000": 5}}, "logit_bias"),
        ({"store": True}, "store"),
        ({"allowed_token_ids": [4000]}, "allowed_token_ids"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"truncate_prompt_tokens": 2000}, "truncate_prompt_tokens"),
    ],
)
def test_errors_name_the_field(serving, fields, param):
    with pytest.raises(ApiError) as e:
        create(serving, **fields)
    assert (e.value.status, e.value.param) == (400, param), e.value.message
    assert serving.engine.submitted == []


def test_a_template_that_rejects_the_conversation_is_a_400(build):
    serving = build(chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ApiError, match="chat template failed: roles must alternate") as e:
        create(serving)
    assert e.value.param == "messages"


def test_stream_options_without_stream_is_a_400(serving):
    with pytest.raises(ApiError) as e:
        create(serving, stream_options={"include_usage": True})
    assert (e.value.status, e.value.param) == (400, "stream_options") and serving.engine.submitted == []


def test_continuous_usage_stats_count_up_from_the_role_chunk(serving):
    serving.engine.reply = serving.engine.text_reply("It is sunny today.")
    frames = stream(serving, stream_options={"include_usage": True, "continuous_usage_stats": True})
    counts = [f["usage"]["completion_tokens"] for f in frames[:-1]]
    n = len(serving.model.tokenizer.encode("It is sunny today."))
    assert counts[0] == 0 and counts[-2] == counts[-1] == n and frames[-2]["choices"] == []
    assert counts[:-1] == sorted(set(counts[:-1]))  # every content chunk counts up


def test_the_models_generation_config_fills_only_what_the_request_leaves_unset(build):
    serving = build(sampling_defaults=SamplingDefaults(temperature=0.7, top_p=0.8, max_tokens=9))
    create(serving)
    create(serving, temperature=0, top_p=None, max_completion_tokens=20)
    got = [(s.temperature, s.top_p, s.max_tokens) for _, _, s in serving.engine.submitted]
    assert got == [(0.7, 0.8, 9), (0.0, 0.8, 20)]


def test_return_token_ids_gives_the_conversations_and_the_answers_ids(serving):
    tok = serving.model.tokenizer
    serving.engine.reply = serving.engine.text_reply("It is sunny.")
    r = create(serving, return_token_ids=True)
    [(_, prompt, _)] = serving.engine.submitted
    assert r.prompt_token_ids == prompt and r.choices[0].token_ids == tok.encode("It is sunny.")
    plain = json.loads(msgspec.json.encode(create(serving)))
    assert plain["prompt_token_ids"] is None and plain["choices"][0]["token_ids"] is None
    frames = stream(serving, return_token_ids=True)[:-1]
    assert frames[0]["prompt_token_ids"] == prompt and all("prompt_token_ids" not in f for f in frames[1:])
    assert [x for f in frames for x in f["choices"][0].get("token_ids", [])] == tok.encode("It is sunny.")


def test_return_tokens_as_token_ids_names_tokens_by_id(serving):
    serving.engine.reply = serving.engine.text_reply("It is sunny.")
    r = create(serving, logprobs=True, top_logprobs=1, return_tokens_as_token_ids=True)
    ids = serving.model.tokenizer.encode("It is sunny.")
    assert [c.token for c in r.choices[0].logprobs.content] == [f"token_id:{t}" for t in ids]
    assert r.choices[0].logprobs.content[0].top_logprobs[0].token == f"token_id:{ids[0]}"


SAYING = [*USER, {"role": "assistant", "content": "An apple a day"}]


def prompt_text(serving) -> str:
    return serving.model.tokenizer.decode(serving.engine.submitted[-1][1], skip_special_tokens=False)


def test_continue_final_message_leaves_the_last_turn_open(serving):
    create(serving, messages=SAYING, continue_final_message=True)
    assert prompt_text(serving).endswith("An apple a day")  # no end of turn, no new turn
    create(serving, messages=SAYING, continue_final_message=True, add_generation_prompt=False)
    assert prompt_text(serving).endswith("An apple a day")
    create(serving, messages=SAYING)
    opened = prompt_text(serving)
    create(serving, messages=SAYING, add_generation_prompt=False)
    closed = prompt_text(serving)
    assert opened.startswith(closed) and len(opened) > len(closed) and "An apple a day" in closed
    with pytest.raises(ApiError) as e:  # vLLM refuses both at once
        create(serving, messages=SAYING, continue_final_message=True, add_generation_prompt=True)
    assert e.value.param == "continue_final_message" and "Cannot set both" in e.value.message


def test_echo_starts_the_answer_with_the_message_it_continues(serving):
    serving.engine.reply = serving.engine.text_reply(", keeps the doctor away.")
    r = create(serving, messages=SAYING, continue_final_message=True, echo=True)
    assert r.choices[0].message.content == "An apple a day, keeps the doctor away."
    frames = stream(serving, messages=SAYING, continue_final_message=True, echo=True)
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert frames[1]["choices"][0]["delta"] == {"content": "An apple a day"}
    assert create(serving, messages=SAYING, echo=False, continue_final_message=True).choices[0].message.content == (
        ", keeps the doctor away."
    )
    # the answer is the assistant's and the last message the user's: nothing to echo
    assert create(serving, echo=True).choices[0].message.content == ", keeps the doctor away."


def test_documents_and_chat_template_kwargs_reach_the_template(build):
    template = (
        "{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}{{ tone }}"
    )
    serving = build(chat_template=template)
    create(serving, documents=[{"title": "Sea", "text": "It is blue."}], chat_template_kwargs={"tone": "!"})
    assert prompt_text(serving) == "[Sea: It is blue.]Weather in Paris?!"
    with pytest.raises(ApiError) as e:
        create(serving, chat_template_kwargs={"documents": []})
    assert e.value.param == "chat_template_kwargs"


def test_any_role_reaches_the_template_which_decides_what_it_means(build):
    # As vLLM: a role the client names is the template's to render (or to skip), not a 400.
    serving = build(chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    create(serving, messages=[{"role": "wizard", "content": "hi"}, {"role": "my-custom-role", "content": "x"}])
    assert prompt_text(serving) == "<wizard>hi<my-custom-role>x"
    qwen = build()  # Qwen's template writes system/user/assistant/tool turns and skips any other
    create(qwen, messages=[{"role": "wizard", "content": "hi"}, {"role": "user", "content": "x"}])
    assert "wizard" not in prompt_text(qwen) and "<|im_start|>user\nx<|im_end|>" in prompt_text(qwen)


def test_a_call_sent_back_with_empty_arguments_has_none(build):
    # As vLLM: `arguments: ""` (a function without parameters, as clients send its call back) is `{}`.
    template = "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}"
    serving = build(chat_template=template)
    for arguments, rendered in (("", "{}"), ('{"a": 1}', '{"a": 1}')):
        call = {"id": "c1", "type": "function", "function": {"name": "now", "arguments": arguments}}
        turns = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
        create(serving, messages=[*turns, {"role": "tool", "tool_call_id": "c1", "content": "noon"}])
        assert prompt_text(serving) == rendered
    with pytest.raises(ApiError, match="JSON text of an object"):
        call["function"]["arguments"] = "[1]"
        create(serving, messages=[*USER, {"role": "assistant", "content": None, "tool_calls": [call]}])


@pytest.mark.parametrize("role", [7, "", None])
def test_a_role_that_is_not_a_word_is_refused(role):
    with pytest.raises(msgspec.ValidationError, match=r"messages\[0\]\.role"):
        body(messages=[{"role": role, "content": "hi"}])


def test_tool_choice_required_lifts_the_tools_defs_to_the_schemas_root(serving):
    """Issue 24 item 5: a tool whose parameters `$ref` their own `$defs` (as pydantic writes them)."""
    import jsonschema_rs

    options = {"type": "object", "properties": {"unit": {"enum": ["C", "F"]}}, "required": ["unit"]}
    params = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "options": {"$ref": "#/$defs/WeatherOptions"}},
        "required": ["city", "options"],
        "$defs": {"WeatherOptions": options},
    }
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": params}}
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
    serving.engine.reply = serving.engine.text_reply(
        '[{"name": "get_weather", "parameters": {"city": "Oslo", "options": {"unit": "C"}}}]'
    )
    create(serving, tools=[tool, other], tool_choice="required")
    schema = json.loads(serving.engine.submitted[0][2].structured_outputs.json)
    assert schema["$defs"] == {"WeatherOptions": options}
    validator = jsonschema_rs.validator_for(schema)
    assert validator.is_valid([{"name": "get_weather", "parameters": {"city": "Oslo", "options": {"unit": "C"}}}])
    assert not validator.is_valid([{"name": "get_weather", "parameters": {"city": "Oslo", "options": {"unit": "K"}}}])
    clash = {"type": "function", "function": {"name": "b", "parameters": {**params, "$defs": {"WeatherOptions": {}}}}}
    with pytest.raises(ApiError) as e:
        create(serving, tools=[tool, clash], tool_choice="required")
    assert e.value.param == "tools" and "WeatherOptions" in e.value.message


def test_prompt_logprobs_for_every_choice_past_their_bound_are_a_400(build):
    """Each of n choices scores the conversation again: prompt_logprobs × n × its length is bounded as on
    /v1/completions (issue 28), refused before the engine gets anything."""
    serving = build(max_seq_len=8192)
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ApiError, match="at most 524288") as e:
        create(serving, messages=long, prompt_logprobs=20, n=16, max_tokens=1)
    assert (e.value.status, e.value.param) == (400, "prompt_logprobs") and serving.engine.submitted == []
    r = create(serving, messages=long, prompt_logprobs=20, max_tokens=1)  # one choice is within it
    assert len(r.prompt_logprobs) == len(serving.engine.submitted[0][1])
