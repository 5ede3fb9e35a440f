"""One request's text stream (text/stream.py), as the API workers and the offline LLM use it: token ids in, text
out, cut at a stop string, with the finish reason and whether the engine must be told to stop."""

from __future__ import annotations

import pytest

from ringllm.text.stream import Piece, TextStream
from ringllm.text.tokenizer import Tokenizer
from tests.tokenizer_files import bpe_tokenizer

TEXT = "Once upon a time, 日本語 there was a function"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(bpe_tokenizer(tmp_path_factory.mktemp("tok")))


def _run(tok, stop, finish="length", chunk=1):
    ids = tok.encode(TEXT)
    stream = TextStream(tok, tok.encode("prompt"), stop)
    pieces = []
    for i in range(0, len(ids), chunk):
        last = i + chunk >= len(ids)
        pieces.append(stream.feed(ids[i : i + chunk], finish if last else None))
        if stream.finished:
            break
    return pieces


@pytest.mark.parametrize("chunk", [1, 3])
def test_without_stop_strings_the_text_is_the_decoded_tokens(tok, chunk):
    pieces = _run(tok, [], chunk=chunk)
    assert "".join(p.text for p in pieces) == TEXT
    assert [p.finish_reason for p in pieces][-1] == "length" and not any(p.abort for p in pieces)
    assert all(p.finish_reason is None for p in pieces[:-1])


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_stop_string_ends_the_text_and_asks_for_an_abort(tok, chunk):
    pieces = _run(tok, ["日本", "never"], chunk=chunk)
    assert "".join(p.text for p in pieces) == "Once upon a time, "
    assert pieces[-1].finish_reason == "stop" and pieces[-1].abort  # the engine was still generating


def test_a_stop_string_in_the_engines_last_piece_needs_no_abort(tok):
    stream = TextStream(tok, [], ["function"])
    assert stream.feed(tok.encode(TEXT), "length") == Piece(TEXT[: TEXT.index("function")], "stop", False)
    assert stream.feed(tok.encode(" more"), None) == Piece("", "stop", False)  # nothing after the end


def test_a_held_back_tail_comes_out_when_the_engine_finishes(tok):
    stream = TextStream(tok, [], ["a function!"])
    text = stream.feed(tok.encode(TEXT)).text
    assert text == TEXT[: -len("a function")] and not stream.finished  # "a function" may become the stop
    assert stream.feed([], "stop") == Piece("a function", "stop", False)


def test_a_character_cut_at_the_end_decodes_as_one_decode_does(tok):
    ids = tok.encode("日")
    assert len(ids) > 1  # a byte-level vocabulary splits it
    stream = TextStream(tok, [])
    assert stream.feed(ids[:1]).text == ""  # not a character yet
    assert stream.feed([], "length").text == tok.decode(ids[:1])


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_min_tokens_keeps_stop_strings_from_ending_the_first_tokens(tok, chunk):
    """As in vLLM: the text of the first min_tokens tokens cannot end the request on a stop string; a stop
    string after them does, wherever the engine's pieces cut the tokens."""
    ids = tok.encode(TEXT)
    upon = len(tok.encode("Once upon"))  # "upon" is complete within these tokens
    for min_tokens, stops, want, reason in [
        (0, ["upon", "nothing"], "Once ", "stop"),
        (upon, ["upon", "nothing"], TEXT, "length"),
        (upon, ["upon", "a"], "Once upon ", "stop"),  # "a" after them still stops it
    ]:
        stream = TextStream(tok, [], stops, min_tokens=min_tokens)
        pieces = []
        for i in range(0, len(ids), chunk):
            last = i + chunk >= len(ids)
            pieces.append(stream.feed(ids[i : i + chunk], "length" if last else None))
        assert "".join(p.text for p in pieces) == want and stream.finish_reason == reason


def test_without_a_tokenizer_there_is_no_text_only_the_finish(tok):
    # A server without the model's tokenizer (--skip-tokenizer-init): token ids in and out, no text.
    text = TextStream(None, [1, 2])
    assert text.feed(tok.encode("hello there")) == Piece("", None, False)
    assert text.feed([5], "length") == Piece("", "length", False) and text.finished
    with pytest.raises(ValueError, match="need a tokenizer"):
        TextStream(None, [1, 2], stop=["x"])
