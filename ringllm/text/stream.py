"""One request's output as text, the same for the API workers (app/requests.py) and the offline API
(engine/llm.py): token ids in as the engine sends them, text out, detokenized incrementally and cut at the first
stop string, with the request's finish reason, and whether the engine must be told to stop: it does not see
stop strings, so a request that one ends would otherwise generate on."""

from __future__ import annotations

from typing import NamedTuple

from ringllm.text.detokenize import IncrementalDetokenizer
from ringllm.text.stop_strings import StopStringMatcher


class Piece(NamedTuple):
    text: str  # the text the new tokens made certain (empty while a character or a stop string is incomplete)
    finish_reason: str | None  # the request's, once it has ended: the engine's, or "stop" for a stop string
    abort: bool  # a stop string ended the request while the engine runs it: abort it there


class TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str] | None = None, min_tokens: int = 0):
        """`min_tokens`: the request's; as in vLLM, the text of its first min_tokens tokens cannot end it on a stop
        string (one may begin there and end later). `tokenizer` None: no text at all, only the finish (a server
        without a tokenizer, vLLM's --skip-tokenizer-init, whose requests can have no stop strings)."""
        if tokenizer is None and stop:
            raise ValueError("stop strings are matched on text: they need a tokenizer")
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer is not None else None
        self._stops = StopStringMatcher(stop or [])
        self._exempt_tokens = min_tokens  # tokens still to come whose text no stop string may end in
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token_ids: list[int], finish_reason: str | None = None) -> Piece:
        """The piece these new tokens make; `finish_reason` is the engine's when they end the request. Text
        after a stop string is dropped, and so is anything fed after the request ended."""
        if self.finished:
            return Piece("", self.finish_reason, False)
        out = ""
        if self._exempt_tokens and token_ids:
            early, token_ids = token_ids[: self._exempt_tokens], token_ids[self._exempt_tokens :]
            self._exempt_tokens -= len(early)
            out = self._stops.feed(self._text(early), exempt=True)
        text = self._text(token_ids)
        if finish_reason is not None and self._detok is not None:
            text += self._detok.flush()  # an incomplete character at the end decodes to U+FFFD
        out += self._stops.feed(text)
        if self._stops.stopped:
            self.finish_reason = "stop"
            return Piece(out, "stop", abort=finish_reason is None)
        if finish_reason is not None:
            out += self._stops.flush()  # the held-back tail never became a stop string
            self.finish_reason = finish_reason
        return Piece(out, finish_reason, False)

    def _text(self, token_ids: list[int]) -> str:
        return self._detok.add(token_ids) if self._detok is not None else ""
