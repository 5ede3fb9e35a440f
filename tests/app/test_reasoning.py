"""Reasoning parsing (app/reasoning.py): `<think>` ... `</think>` becomes reasoning_content, the rest content;
the same split whether the text comes whole or in pieces cut anywhere (or at every token boundary of a
tokenizer). Through a server: tests/e2e/test_reasoning.py."""

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
