"""/tokenize and /detokenize's serving object, and /v1/models' listing: the tokens a prompt or a conversation is
sent as, the text of token ids, and errors naming their field."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest

from ringllm.app import chat as chat_io
from ringllm.app.errors import ApiError
from ringllm.app.schemas import DetokenizeRequest, Message, TokenizeRequest
from ringllm.text.chat_template import chat_prompt_ids

MESSAGES = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def tokenize(serving, **fields) -> dict:
    body = msgspec.convert(fields, TokenizeRequest)
    return asyncio.run(serving.tokenize.tokenize(body))


def test_a_prompt_is_tokenized_as_completions_tokenizes_it(serving):
    tok = serving.model.tokenizer
    got = tokenize(serving, prompt="The sea is calm")
    tokens = tok.encode("The sea is calm", True)
    assert got == {"tokens": tokens, "count": got["count"], "max_model_len": 1024, "token_strs": None}
    assert got["count"] == len(got["tokens"])


def test_messages_are_tokenized_as_the_chat_route_prompts_them(serving):
    tok = serving.model.tokenizer
    messages = chat_io.template_messages(msgspec.convert(MESSAGES, list[Message]), tok.template_text)
    assert messages[0]["role"] == "system"  # a template that does not name `developer`
    assert tokenize(serving, messages=MESSAGES)["tokens"] == chat_prompt_ids(tok, messages)


@pytest.mark.parametrize("fields", [{}, {"prompt": "x", "messages": MESSAGES}])
def test_either_a_prompt_or_messages(serving, fields):
    with pytest.raises(ApiError, match="either prompt or messages") as e:
        tokenize(serving, **fields)
    assert e.value.param == "prompt"


def test_detokenize_round_trips_and_names_an_unknown_id(serving):
    tokens = tokenize(serving, prompt="naïve café")["tokens"]
    assert serving.tokenize.detokenize(DetokenizeRequest(tokens=tokens)) == {"prompt": "naïve café"}
    vocab = serving.model.tokenizer.vocab_size
    with pytest.raises(ApiError, match=f"token id {vocab} is out of vocabulary") as e:
        serving.tokenize.detokenize(DetokenizeRequest(tokens=[1, vocab]))
    assert e.value.param == "tokens"


def test_the_model_listing_names_every_served_name(serving):
    listing = serving.model.listing()
    assert [m["id"] for m in listing["data"]] == ["m", "other-name"]
    root = Path(serving.model.path).name  # the checkpoint's name: its path is the operator's (issue 28)
    assert all(m["max_model_len"] == 1024 and m["root"] == root for m in listing["data"])


def test_return_token_strs_gives_each_ids_token_string(serving):
    got = tokenize(serving, prompt="The sea", return_token_strs=True)
    backend = serving.model.tokenizer.backend
    assert got["token_strs"] == [backend.id_to_token(i) for i in got["tokens"]] and all(got["token_strs"])
    assert tokenize(serving, prompt="The sea", add_special_tokens=False)["tokens"] == (
        serving.model.tokenizer.encode("The sea", False)
    )


def _template(serving, messages, **options) -> str:
    tok = serving.model.tokenizer
    convo = chat_io.template_messages(msgspec.convert(messages, list[Message]), tok.template_text)
    return tok.apply_chat_template(convo, options.pop("tools", None), **options)


def test_chat_options_render_as_transformers_renders_them(serving):
    """add_generation_prompt false, continue_final_message (the last turn left open), tools, template variables:
    the ids are those of transformers' render of the same options."""
    tok = serving.model.tokenizer
    closed = tokenize(serving, messages=MESSAGES, add_generation_prompt=False)["tokens"]
    assert closed == tok.encode_chat(_template(serving, MESSAGES, add_generation_prompt=False))
    assert closed != tokenize(serving, messages=MESSAGES)["tokens"]
    partial = [*MESSAGES, {"role": "assistant", "content": "Hel"}]
    opened = tokenize(serving, messages=partial, add_generation_prompt=False, continue_final_message=True)
    text = tok.decode(opened["tokens"], skip_special_tokens=False)
    assert text.endswith("Hel") and text == _template(
        serving, partial, add_generation_prompt=False, continue_final_message=True
    )
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with_tools = tokenize(serving, messages=MESSAGES, tools=[tool])["tokens"]
    assert "get_weather" in tok.decode(with_tools, skip_special_tokens=False)
    assert with_tools == tok.encode_chat(_template(serving, MESSAGES, tools=[tool]))


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"messages": MESSAGES, "continue_final_message": True}, "continue_final_message"),  # with the default true
        ({"messages": MESSAGES, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
        ({"prompt": "x", "tools": []}, "tools"),
        ({"prompt": "x", "model": "nope"}, "model"),
    ],
)
def test_bad_tokenize_options_are_a_400_naming_the_field(serving, fields, param):
    with pytest.raises(ApiError) as e:
        tokenize(serving, **fields)
    assert e.value.param == param and e.value.status in (400, 404)


def test_unknown_tokenize_fields_are_refused_by_name():
    for kind, body in ((TokenizeRequest, {"prompt": "x", "foo": 1}), (DetokenizeRequest, {"tokens": [1], "foo": 1})):
        with pytest.raises(msgspec.ValidationError, match="unknown field `foo`"):
            msgspec.convert(body, kind)


def _refused(call) -> ApiError:
    with pytest.raises(ApiError) as e:
        call()
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    return e.value


def test_a_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(serving, monkeypatch):
    """/tokenize is bounded as the generation routes are (issue 28: six 8 MB texts grew a worker to 7.5 GB):
    past the context's characters at the tokenizer's longest token, a 400 naming the limit, and no tokenizing."""
    model = serving.model
    calls = []
    monkeypatch.setattr(model.tokenizer, "encode", lambda *a, **k: calls.append(a) or [1])
    error = _refused(lambda: tokenize(serving, prompt="a" * (model.max_text_chars + 1)))
    assert error.param == "prompt" and f"{model.max_text_chars} characters at most" in error.message
    assert "1024 tokens" in error.message and calls == []
    assert tokenize(serving, prompt="a" * model.max_text_chars)["tokens"] == [1]  # at the limit: tokenized


def test_a_conversation_past_the_context_is_refused_by_messages_and_by_length(serving):
    error = _refused(lambda: tokenize(serving, messages=[{"role": "user", "content": "x"}] * 1025))
    assert error.param == "messages" and "1025 messages" in error.message and "at most 1024" in error.message
    long = [{"role": "user", "content": "a" * serving.model.max_text_chars}]
    assert _refused(lambda: tokenize(serving, messages=long)).param == "messages"


def test_detokenize_refuses_more_ids_than_the_context_holds(serving):
    error = _refused(lambda: serving.tokenize.detokenize(DetokenizeRequest(tokens=[1] * 1025)))
    assert error.param == "tokens" and "1025 token ids" in error.message
    a = serving.model.tokenizer.encode("a")
    assert serving.tokenize.detokenize(DetokenizeRequest(tokens=a * 1024)) == {"prompt": "a" * 1024}


def test_long_texts_are_tokenized_one_at_a_time_and_the_heap_handed_back(build, monkeypatch):
    """A worker's tokenizing peak is one text's, not one per concurrent request: a long text's encode waits up
    to 1 s for a second one to start beside it, which it never does."""
    import threading

    from ringllm.app import served_model

    model = build(max_seq_len=4096).model  # a context that holds a text tokenized off the event loop
    encode, active, most, entered = model.tokenizer.encode, [0], [0], threading.Event()
    trims = []

    def watched(text, special=False):
        active[0] += 1
        most[0] = max(most[0], active[0])
        if active[0] > 1:
            entered.set()
        else:
            entered.wait(1.0)  # a concurrent encode would set it
        active[0] -= 1
        return encode(text, special)

    monkeypatch.setattr(model.tokenizer, "encode", watched)
    monkeypatch.setattr(served_model, "trim_heap", lambda: trims.append(1))
    text = "The sea is calm " * (served_model.OFF_LOOP_CHARS // 16 + 1)

    async def three():
        return await asyncio.gather(*(model.tokenize(text) for _ in range(3)))

    assert asyncio.run(three()) == [encode(text)] * 3
    assert most == [1] and len(trims) == 3


def test_a_server_without_a_tokenizer_refuses_both_routes_saying_why(build):
    serving = build(skip_tokenizer_init=True, vocab_size=4096)
    for run in (
        lambda: tokenize(serving, prompt="The sea"),
        lambda: tokenize(serving, messages=MESSAGES),
        lambda: serving.tokenize.detokenize(msgspec.convert({"tokens": [5, 6]}, DetokenizeRequest)),
    ):
        with pytest.raises(ApiError, match="--skip-tokenizer-init") as e:
            run()
        assert e.value.status == 400
