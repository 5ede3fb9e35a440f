"""bad_words as the token sequences the sampler bans (text/bad_words.py), by vLLM's rule: each word alone, and
after a space where that spelling is another first token of the same length."""

from __future__ import annotations

import pytest

from ringllm.ipc.sampling import MAX_BAD_WORDS, FieldError
from ringllm.text.bad_words import bad_words_token_ids
from ringllm.text.tokenizer import Tokenizer
from tests.tokenizer_files import bpe_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(bpe_tokenizer(tmp_path_factory.mktemp("tok")))


def test_a_word_and_its_spelling_after_a_space(tok):
    a, spaced_a = tok.encode("a"), tok.encode(" a")
    assert len(a) == len(spaced_a) == 1 and a != spaced_a
    assert bad_words_token_ids(tok, ["a"]) == [a, spaced_a]
    # leading whitespace is dropped first, and a word given twice counts once
    assert bad_words_token_ids(tok, ["  a", "a"]) == [a, spaced_a]


def test_a_spelling_after_a_space_of_another_length_is_not_added(tok):
    """vLLM adds the spaced spelling only where it is as long as the word alone: here " time" is one token and
    "time" three, and " Once" is a space token then "Once"."""
    for word in ("time", "Once"):
        assert len(tok.encode(" " + word)) != len(tok.encode(word))
        assert bad_words_token_ids(tok, [word]) == [tok.encode(word)]


def test_a_word_that_makes_no_token_and_too_many_words_are_refused(tok):
    with pytest.raises(FieldError, match="makes no token") as e:
        bad_words_token_ids(tok, ["   "])
    assert e.value.field == "bad_words"
    words = [f"w{i}" for i in range(MAX_BAD_WORDS + 1)]
    with pytest.raises(FieldError, match=f"more than {MAX_BAD_WORDS}"):
        bad_words_token_ids(tok, words)
