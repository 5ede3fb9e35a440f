"""/tokenize and /detokenize's serving object, and /v1/models' listing: the tokens a prompt or a conversation is
sent as, the text of token ids, and errors naming their field."""

from __future__ import annotations

import asyncio

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
    assert got == {"tokens": tok.encode("The sea is calm", True), "count": got["count"], "max_model_len": 1024}
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
    assert serving.tokenize.detokenize(DetokenizeRequest(tokens)) == {"prompt": "naïve café"}
    vocab = serving.model.tokenizer.vocab_size
    with pytest.raises(ApiError, match=f"token id {vocab} is outside the vocabulary") as e:
        serving.tokenize.detokenize(DetokenizeRequest([1, vocab]))
    assert e.value.param == "tokens"


def test_the_model_listing_names_every_served_name(serving):
    listing = serving.model.listing()
    assert [m["id"] for m in listing["data"]] == ["m", "other-name"]
    assert all(m["max_model_len"] == 1024 and m["root"] == serving.model.path for m in listing["data"])
