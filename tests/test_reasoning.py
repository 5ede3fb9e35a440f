"""Reasoning parsing (app/reasoning.py): `<think>` ... `</think>` becomes reasoning_content, the rest content;
the same split whether the text comes whole or in pieces cut anywhere; then `ringllm serve` on a Qwen3
checkpoint whose template opens `<think>` (or closes it at once with enable_thinking false), through the
official openai client, streaming and not."""

from __future__ import annotations

import pytest

from ringllm.app.reasoning import ReasoningParser, prompt_opens_reasoning

# (parser, prompt ends inside <think>, model text, expected reasoning, expected content)
CASES = [
    ("qwen3", False, "<think>\nI should greet.\n</think>\n\nHello!", "\nI should greet.\n", "Hello!"),
    ("qwen3", False, "\n<think>a < b</think>answer </think> kept", "a < b", "answer </think> kept"),
    ("qwen3", False, "Hello <think> is text here", None, "Hello <think> is text here"),
    ("qwen3", False, "<think>cut off by max_tokens", "cut off by max_tokens", ""),
    ("qwen3", False, "<thi", None, "<thi"),
    ("qwen3", False, "<think></think>answer", "", "answer"),
    ("qwen3", False, "", None, ""),
    ("qwen3", True, "still thinking</think>\n\ndone", "still thinking", "done"),
    ("deepseek_r1", False, "no opening tag</think>answer", "no opening tag", "answer"),
    ("deepseek_r1", False, "<think>with the tag</think>answer", "with the tag", "answer"),
    ("deepseek_r1", False, "never closed </thin", "never closed </thin", ""),
]


def run(kind, opened, pieces):
    p = ReasoningParser(kind, opened)
    reasoning, content = "", ""
    for piece in pieces:
        r, c = p.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = p.finish()
    return (reasoning + r if p.reasoned else None), content + c


def splits(text):
    """The text whole, cut at every single point, and cut between every two characters."""
    yield [text]
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)


@pytest.mark.parametrize("kind,opened,text,reasoning,content", CASES)
def test_split_at_every_point(kind, opened, text, reasoning, content):
    for pieces in splits(text):
        assert run(kind, opened, pieces) == (reasoning, content), pieces


def test_split_at_every_token_boundary_of_a_tokenizer(tmp_path):
    """Pieces as a real stream makes them: the incremental detokenizer's output, token by token and in every
    two-part cut of the token sequence, with <think> and </think> single tokens."""
    from ringllm.text.detokenize import IncrementalDetokenizer
    from ringllm.text.tokenizer import Tokenizer
    from tests.chat_models import scripted_checkpoint

    path = scripted_checkpoint(tmp_path / "m", ["\n", "<think>", "<|im_end|>"], "")
    tok = Tokenizer(path)
    text = "<think>\nLet me see: 2 < 3.\n</think>\n\nYes, 2 < 3."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) > 20
    for cut in range(len(ids) + 1):
        for groups in ([ids[:cut], ids[cut:]], [[t] for t in ids]):
            detok = IncrementalDetokenizer(tok)
            pieces = [detok.add(g) for g in groups] + [detok.flush()]
            assert run("qwen3", False, pieces) == ("\nLet me see: 2 < 3.\n", "Yes, 2 < 3."), cut


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def test_unknown_parser():
    with pytest.raises(ValueError, match="qwen3"):
        ReasoningParser("nope")


# ---- served: a Qwen3 checkpoint whose greedy answer is "<think>why</think>ok" ----
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)
# After the prompt's last "\n" the model writes "<think>why</think>ok".
SCRIPT = ["\n", "<think>", "w", "h", "y", "</think>", "o", "k", "<|im_end|>"]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from openai import OpenAI

    from tests.chat_models import scripted_checkpoint
    from tests.helpers import start_server, stop_server

    cache = tmp_path_factory.mktemp("reasoning")
    path = scripted_checkpoint(cache / "qwen3-think", SCRIPT, TEMPLATE)
    proc, base = start_server(cache, "--model", str(path), "--served-model-name", "m")
    try:
        yield OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    finally:
        stop_server(proc)


HI = [{"role": "user", "content": "hi"}]


def test_served_reasoning_content(client):
    r = client.chat.completions.create(model="m", messages=HI, max_tokens=16, temperature=0)
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == ("why", "ok")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(SCRIPT) - 1
    chunks = list(client.chat.completions.create(model="m", messages=HI, max_tokens=16, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    assert (reasoning, "".join(d.content or "" for d in deltas)) == ("why", "ok")
    assert not any(d.content and "<think>" in d.content for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_served_enable_thinking_false_reaches_the_template(client):
    r = client.chat.completions.create(
        model="m",
        messages=HI,
        max_tokens=16,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    msg = r.choices[0].message
    assert msg.content == "ok" and (msg.model_extra or {}).get("reasoning_content") is None


def test_served_reasoning_cut_by_max_tokens(client):
    r = client.chat.completions.create(model="m", messages=HI, max_tokens=3, temperature=0)
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == ("wh", None)
    assert r.choices[0].finish_reason == "length"


def test_chat_template_kwargs_may_not_replace_the_routes_variables(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(
            model="m", messages=HI, max_tokens=4, extra_body={"chat_template_kwargs": {"messages": []}}
        )


def test_reasoning_parser_none_flag_leaves_the_text_whole(tmp_path):
    """--reasoning-parser none reaches the API workers: the think block stays in the content."""
    from openai import OpenAI

    from tests.chat_models import scripted_checkpoint
    from tests.helpers import start_server, stop_server

    path = scripted_checkpoint(tmp_path / "qwen3-think", SCRIPT, TEMPLATE)
    proc, base = start_server(tmp_path, "--model", str(path), "--served-model-name", "m", "--reasoning-parser", "none")
    try:
        client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="m", messages=HI, max_tokens=16, temperature=0)
        msg = r.choices[0].message
        assert msg.content == "<think>why</think>ok"
        assert (msg.model_extra or {}).get("reasoning_content") is None
    finally:
        stop_server(proc)
