"""vLLM's bad_words as token sequences: the sampler bans a sequence's last token where the output so far ends with
the tokens before it, so a word is never completed. A word is tokenized as it would start the text and as it
would follow a space (a BPE tokenizer spells the two differently), as vLLM's SamplingParams.update_from_tokenizer
does, so that the same request bans the same tokens here and there. The API worker and the offline LLM both call
this; the engine refuses bad_words that reach it untokenized."""

from __future__ import annotations

from collections.abc import Iterable

from ringllm.ipc.sampling import MAX_BAD_WORDS, FieldError


def bad_words_token_ids(tokenizer, words: Iterable[str]) -> list[list[int]]:
    """The token sequences that `words` ban (a word given twice counts once). For each word, stripped of leading
    whitespace: its tokens alone, and those of " " + word where that spelling is a different first token of the
    same length (vLLM's rule: a space that merges differently is another way to write the word). Raises
    FieldError("bad_words") for a word that makes no token, and for more sequences than a request may ban."""
    out: list[list[int]] = []
    for word in dict.fromkeys(w.lstrip() for w in words):
        alone = tokenizer.encode(word, add_special_tokens=False)
        if not alone:
            raise FieldError("bad_words", "bad_words: a word of only whitespace makes no token")
        out.append(alone)
        spaced = tokenizer.encode(" " + word, add_special_tokens=False)
        if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
        if len(out) > MAX_BAD_WORDS:
            raise FieldError("bad_words", f"bad_words make more than {MAX_BAD_WORDS} token sequences")
    return out
