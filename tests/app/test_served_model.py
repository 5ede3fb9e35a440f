"""What the server's vLLM options make of a request before the engine sees it (app/served_model.py): more logprobs
than --max-logprobs and a priority without --scheduling-policy priority are 400s naming the field, whole or
streamed, before anything is submitted; --enable-force-include-usage ends every stream with its usage."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from ringllm.app.errors import ApiError
from ringllm.app.schemas import ChatRequest, CompletionRequest
from tests.app.conftest import collect_frames, never

MESSAGES = [{"role": "user", "content": "hi"}]


def _completion(serving, **fields):
    body = msgspec.convert({"prompt": "The sea", **fields}, CompletionRequest)
    return asyncio.run(serving.completions.create(body, "r", never))


def _chat(serving, **fields):
    body = msgspec.convert({"messages": MESSAGES, **fields}, ChatRequest)
    return asyncio.run(serving.chat.create(body, "r", never))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "route,fields,param",
    [
        (_completion, {"logprobs": 4}, "logprobs"),
        (_chat, {"logprobs": True, "top_logprobs": 4}, "top_logprobs"),
        (_completion, {"prompt_logprobs": 4}, "prompt_logprobs"),
        (_completion, {"priority": 3}, "priority"),
        (_chat, {"priority": -1}, "priority"),
    ],
)
def test_what_the_servers_options_forbid_is_a_400_before_anything_starts(build, route, fields, param, stream):
    serving = build(max_logprobs=3)
    if stream and "prompt_logprobs" in fields:
        pytest.skip("prompt_logprobs is refused with stream for its own reason")
    with pytest.raises(ApiError) as e:
        route(serving, stream=stream, **fields)
    assert (e.value.status, e.value.param) == (400, param), e.value.message
    assert serving.engine.submitted == []


def test_within_the_servers_options_the_same_requests_run(build):
    serving = build(max_logprobs=3, priority_scheduling=True)
    _completion(serving, logprobs=3, prompt_logprobs=3, max_tokens=2)
    _chat(serving, logprobs=True, top_logprobs=3, priority=5, max_tokens=2)
    assert [s.priority for _, _, s in serving.engine.submitted] == [0, 5]


def test_force_include_usage_ends_every_stream_with_its_usage(build):
    async def frames(serving, route, body):
        return await collect_frames(await route.create(body, "r", never))

    for force in (False, True):
        serving = build(force_include_usage=force)
        for route, kind, fields in (
            (serving.completions, CompletionRequest, {"prompt": "The sea"}),
            (serving.chat, ChatRequest, {"messages": MESSAGES}),
        ):
            body = msgspec.convert({**fields, "stream": True, "max_tokens": 3}, kind)
            events = asyncio.run(frames(serving, route, body))[:-1]  # the [DONE] marker last
            last = events[-1]
            if force:
                assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
                assert all(e.get("usage") is None for e in events[:-1])
            else:
                assert last["choices"] and last.get("usage") is None


def test_the_token_id_option_is_the_served_models(build):
    assert build(return_tokens_as_token_ids=True).model.return_tokens_as_token_ids is True
    assert build().model.return_tokens_as_token_ids is False


# ---- --skip-tokenizer-init: no tokenizer in the worker, token ids in and out ----
def _tokenless(build):
    return build(skip_tokenizer_init=True, vocab_size=4096)


def test_without_a_tokenizer_token_ids_go_in_and_come_out_with_empty_text(build):
    serving = _tokenless(build)
    script = serving.engine.tokenizer.encode("Once upon a time")  # what the fake engine generates
    r = _completion(serving, prompt=[5, 6, 7], max_tokens=4, return_token_ids=True, echo=True, prompt_logprobs=1)
    [choice] = r.choices
    assert choice.text == "" and choice.token_ids == script[:4] and choice.prompt_token_ids == [5, 6, 7]
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 4
    assert all(e is None or all(p.decoded_token is None for p in e.values()) for e in choice.prompt_logprobs)
    # logprobs name tokens by id there (the request's return_tokens_as_token_ids, or the server's option)
    lps = _completion(serving, prompt=[5], max_tokens=2, logprobs=1, return_tokens_as_token_ids=True).choices[0]
    assert lps.logprobs.tokens == [f"token_id:{t}" for t in script[:2]]

    async def frames():
        body = msgspec.convert(
            {"prompt": [5], "max_tokens": 3, "stream": True, "return_token_ids": True}, CompletionRequest
        )
        return await collect_frames(await serving.completions.create(body, "r", never))

    chunks = asyncio.run(frames())[:-1]
    assert [c["choices"][0]["text"] for c in chunks] == [""] * len(chunks)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == script[:3]


@pytest.mark.parametrize(
    "route,fields,param",
    [
        (_completion, {}, "prompt"),  # a text prompt
        (_completion, {"prompt": [5], "stop": ["x"]}, "stop"),
        (_completion, {"prompt": [5], "bad_words": ["x"]}, "bad_words"),
        (_completion, {"prompt": [5], "structured_outputs": {"regex": "a+"}}, "structured_outputs"),
        (_completion, {"prompt": [5], "response_format": {"type": "json_object"}}, "response_format"),
        (_completion, {"prompt": [5], "guided_choice": ["a", "b"]}, "guided_choice"),
        (_completion, {"prompt": [5], "logprobs": 1}, "logprobs"),  # named by text unless by id
        (_chat, {}, "messages"),  # a chat is its template's text
    ],
)
def test_without_a_tokenizer_what_needs_text_is_a_400_naming_it(build, route, fields, param):
    serving = _tokenless(build)
    with pytest.raises(ApiError) as e:
        route(serving, **fields)
    assert (e.value.status, e.value.param) == (400, param) and "--skip-tokenizer-init" in e.value.message
    assert serving.engine.submitted == []
