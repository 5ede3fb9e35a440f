"""The request bodies (app/schemas.py): an explicit null for any optional field means unset, as OpenAI's schema
allows and vLLM takes it (the official client sends null for `create(..., temperature=None)`)."""

from __future__ import annotations

import msgspec
import pytest

from ringllm.app.schemas import ChatRequest, CompletionRequest

REQUIRED = {CompletionRequest: {"prompt": "x"}, ChatRequest: {"messages": [{"role": "user", "content": "x"}]}}


@pytest.mark.parametrize("body_type", [CompletionRequest, ChatRequest])
def test_null_for_every_optional_field_is_the_same_as_leaving_it_out(body_type):
    required = REQUIRED[body_type]
    nulls = {name: None for name in body_type.__struct_fields__ if name not in required}
    assert {"temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "seed"} <= set(nulls)
    with_nulls = msgspec.json.decode(msgspec.json.encode({**required, **nulls}), type=body_type)
    without = msgspec.json.decode(msgspec.json.encode(required), type=body_type)
    assert with_nulls == without
    assert with_nulls.sampling_params(max_tokens=3) == without.sampling_params(max_tokens=3)
    assert (with_nulls.n, with_nulls.stream) == (1, False)  # the OpenAI fields' own defaults


def test_null_is_unset_inside_stream_options_and_for_openai_booleans():
    chat = msgspec.json.decode(
        b'{"messages": [{"role": "user", "content": "x"}], "logprobs": null, "parallel_tool_calls": null,'
        b' "stream": true, "stream_options": {"include_usage": null, "continuous_usage_stats": null}}',
        type=ChatRequest,
    )
    assert (chat.logprobs, chat.parallel_tool_calls) == (False, True)
    assert chat.stream_options is not None and chat.stream_options.usage_in() == (False, False)
    completion = msgspec.json.decode(b'{"prompt": "x", "echo": null}', type=CompletionRequest)
    assert completion.echo is False


def test_a_set_field_keeps_its_bounds():
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        msgspec.json.decode(b'{"prompt": "x", "temperature": 3}', type=CompletionRequest)
