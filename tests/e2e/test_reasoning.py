"""`ringllm serve` on a scripted Qwen3 checkpoint whose template opens `<think>` (or closes it at once with
enable_thinking false), through the official openai client: reasoning_content, cut by max_tokens, the
template's own variables kept, and --reasoning-parser none. The parser alone: tests/app/test_reasoning.py."""

from __future__ import annotations

import pytest

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
