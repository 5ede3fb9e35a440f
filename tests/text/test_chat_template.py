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


# ---- chat templates render as transformers renders them (issue 12, item 12) ----
TEMPLATES = {
    "break": "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}",
    "continue": "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }}|"
    "{% endfor %}",
    "tojson": "{{ tools | tojson }}|{{ messages[0] | tojson(indent=2) }}",
    "strftime": "{{ strftime_now('%Y') }}:{{ messages[-1].content }}",
    "namespace": "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.n }}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}",
}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_templates_render_like_transformers(name, demo_path):
    from transformers import AutoTokenizer

    from ringllm.text.tokenizer import Tokenizer

    messages = [
        {"role": "system", "content": "sys <b>&'x'"},
        {"role": "user", "content": "zé 你好"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": "<&>"}}}]
    want = AutoTokenizer.from_pretrained(demo_path).apply_chat_template(
        messages, tools=tools, chat_template=TEMPLATES[name], add_generation_prompt=True, tokenize=False
    )
    got = Tokenizer(demo_path, chat_template=TEMPLATES[name]).apply_chat_template(messages, tools)
    assert got == want
    if name == "tojson":
        assert '{"z": 1, "a": "<&>"}' in got  # neither HTML-escaped nor key-sorted


def test_raise_exception_and_a_broken_template(demo_path):
    import jinja2

    from ringllm.text.chat_template import ChatTemplateError
    from ringllm.text.tokenizer import Tokenizer

    tok = Tokenizer(demo_path, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer(demo_path, chat_template="{% for m in messages %}")


def test_chat_template_option_reads_a_file_or_the_text(tmp_path):
    from ringllm.text.chat_template import ChatTemplateError, read_chat_template

    file = tmp_path / "t.jinja"
    file.write_text("{{ messages[0].content }}")
    assert read_chat_template(str(file)) == "{{ messages[0].content }}"
    assert read_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}").startswith("{% for")
    with pytest.raises(ChatTemplateError, match="no such file, and not template text"):
        read_chat_template(str(tmp_path / "missing.jinja"))
