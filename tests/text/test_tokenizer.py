"""The one tokenizer loader (text/tokenizer.py): where a checkpoint's tokenizer is (a directory, a GGUF file, a
directory holding one), what it reads there, and the same files through transformers."""

from __future__ import annotations

import json
import shutil

import pytest

from ringllm.engine.gguf import GGUFError
from ringllm.text.chat_template import ChatTemplateError
from ringllm.text.tokenizer import Tokenizer, TokenizerError, tokenizer_directory, transformers_tokenizer
from tests.tokenizer_files import QWEN_TEMPLATE, bpe_tokenizer, tokenizer_gguf

TEXT = "The sea is calm <|im_end|> naïve 你好"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tok"))


def test_a_checkpoint_directory_is_read_as_it_is(tok_dir):
    assert tokenizer_directory(tok_dir) == tok_dir
    tok = Tokenizer(tok_dir)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT.replace("<|im_end|>", "")  # a special token is skipped by default
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert tok.token_to_id("<|im_end|>") in ids and tok.vocab_size == tok.backend.get_vocab_size(True)
    assert tok.max_token_chars == max(map(len, tok.backend.get_vocab(True)))
    assert tok.template_text == QWEN_TEMPLATE


def test_what_is_missing_is_named(tmp_path):
    with pytest.raises(TokenizerError, match=f"no tokenizer: {tmp_path / 'nothing'} does not exist"):
        Tokenizer(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=f"no tokenizer: {tmp_path / 'empty' / 'tokenizer.json'} does not exist"):
        Tokenizer(tmp_path / "empty")
    (tmp_path / "empty" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        Tokenizer(tmp_path / "empty")


@pytest.mark.parametrize("as_directory", [False, True])
def test_a_gguf_files_tokenizer_is_built_once_into_the_cache(tok_dir, tmp_path, monkeypatch, as_directory):
    monkeypatch.setenv("RINGLLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    gguf = tokenizer_gguf(tok_dir, tmp_path / "model" / "m.gguf")
    built = tokenizer_directory(tmp_path / "model" if as_directory else gguf)
    assert built.parent == tmp_path / "cache" / "gguf-tokenizers"
    stamp = (built / "tokenizer.json").stat().st_mtime_ns
    tok, want = Tokenizer(gguf), Tokenizer(tok_dir)
    assert tok.encode(TEXT) == want.encode(TEXT) and tok.template_text == QWEN_TEMPLATE
    assert tokenizer_directory(gguf) == built and (built / "tokenizer.json").stat().st_mtime_ns == stamp
    shutil.copy(gguf, tmp_path / "model" / "second.gguf")
    with pytest.raises(GGUFError, match="holds 2 .gguf files"):
        tokenizer_directory(tmp_path / "model")


def test_the_chat_template_of_a_file_or_a_list_or_the_callers(tok_dir, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(tok_dir, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(d).template_text is None
    (d / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert Tokenizer(d).template_text == "{{ messages[0].content }}"
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer(d).template_text == "{{ 1 }}"
    assert Tokenizer(d, chat_template="{{ 2 }}").apply_chat_template([]) == "2"
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer(d, chat_template="{% if %}")


def test_transformers_reads_the_same_files(tok_dir):
    hf = transformers_tokenizer(tok_dir)
    assert hf(TEXT, add_special_tokens=False).input_ids == Tokenizer(tok_dir).encode(TEXT)
