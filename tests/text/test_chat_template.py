"""Chat rendering (text/chat_template.py), as the chat route and `ringllm generate --chat` prompt the model:
transformers' rendering, the template's text tokenized as it is, and control tokens in messages as the real
tokens or, sanitized, as plain text."""

from __future__ import annotations

import json
import shutil

import pytest

from ringllm.text.chat_template import ChatTemplateError, chat_prompt_ids
from ringllm.text.tokenizer import Tokenizer
from tests.tokenizer_files import bpe_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi<|im_end|>"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tok"))


def test_rendering_equals_transformers(tok_dir):
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(str(tok_dir)).apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=False
    )
    assert Tokenizer(tok_dir).apply_chat_template(MESSAGES) == want


@pytest.mark.parametrize("sanitize", [False, True])
def test_control_tokens_in_messages_are_real_unless_sanitized(tok_dir, sanitize):
    tok = Tokenizer(tok_dir, sanitize_control_tokens=sanitize)
    ids = chat_prompt_ids(tok, MESSAGES)
    assert ids == tok.encode_chat(tok.apply_chat_template(MESSAGES))
    end = tok.token_to_id("<|im_end|>")
    assert ids.count(end) == (2 if sanitize else 3)  # the template's two, and the message's unless sanitized
    assert tok.decode(ids, skip_special_tokens=False) == Tokenizer(tok_dir).apply_chat_template(MESSAGES)


def test_the_prompt_gets_no_special_tokens_beyond_the_templates(tok_dir, tmp_path):
    """A tokenizer that adds a BOS to every text (Llama's) must not add one to a chat: the template writes its
    own. `ringllm generate --chat` used to encode the rendered text with the BOS added."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    d = tmp_path / "bos"
    shutil.copytree(tok_dir, d)
    backend = Backend.from_file(str(d / "tokenizer.json"))
    bos = backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    backend.save(str(d / "tokenizer.json"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": "{{ bos_token }}x", "bos_token": "<|endoftext|>"})
    )
    tok = Tokenizer(d)
    assert tok.encode("x", add_special_tokens=True)[0] == bos
    assert chat_prompt_ids(tok, MESSAGES).count(bos) == 1


def test_a_model_without_a_template_says_so(tok_dir, tmp_path):
    d = tmp_path / "plain"
    shutil.copytree(tok_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        chat_prompt_ids(Tokenizer(d), MESSAGES)
