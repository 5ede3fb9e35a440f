"""The incremental detokenizer: DecodeStream (where the tokenizer has a `tokenizers.Tokenizer`) and the window
decode give the same text as one decode of all the ids, token by token or in chunks, and a sequence cut inside a
character flushes what one decode gives (U+FFFD)."""

from __future__ import annotations

import pytest

from ringllm.engine.demo import demo_model_path
from ringllm.text.detokenize import IncrementalDetokenizer
from ringllm.text.tokenizer import Tokenizer

TEXTS = [
    "The sea is calm tonight, and the tide is full.",
    "naïve café — 你好，世界！🎉 emoji 👩‍👩‍👧 and tabs\tand\nnewlines",
    "ÅÄÖ åäö ß ø ñ — «quoted» ‘single’ “double” … 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(demo_model_path())


def _streamed(tok, prompt: list[int], ids: list[int], chunk: int, window_only: bool) -> str:
    detok = IncrementalDetokenizer(tok, prompt)
    if window_only:
        detok._stream = None  # the fallback for tokenizers without a tokenizers.Tokenizer behind them
    text = "".join(detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk))
    return text + detok.flush()


@pytest.mark.parametrize("window_only", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_equals_one_decode(tok, chunk, window_only):
    assert IncrementalDetokenizer(tok)._stream is not None  # the demo tokenizer takes the DecodeStream path
    prompt = tok.encode("Once upon a time")
    for text in TEXTS:
        ids = tok.encode(text)
        assert _streamed(tok, prompt, ids, chunk, window_only) == tok.decode(ids)
        for cut in range(1, len(ids)):  # every cut, including inside a multi-byte character
            assert _streamed(tok, prompt, ids[:cut], chunk, window_only) == tok.decode(ids[:cut]), (text, cut)


def test_one_token_at_a_time_through_multibyte_characters(tok):
    text = "café 日本語 🚀 done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == text


def test_a_transformers_tokenizer_takes_the_decode_stream_path_too(tok):
    from ringllm.text.tokenizer import transformers_tokenizer

    hf = transformers_tokenizer(demo_model_path())
    assert IncrementalDetokenizer(hf)._stream is not None
    ids = tok.encode(TEXTS[1])
    detok = IncrementalDetokenizer(hf)
    assert "".join(detok.add([i]) for i in ids) + detok.flush() == TEXTS[1]
