"""A scripted stand-in for the engine replicas behind the serving objects (app/requests.py's EngineConnection):
no rings, no engine process. Each generation is answered by `reply(ids, sampling)`: the token deltas the engine
would send (by default the tokens of `text`, one per delta, cut at max_tokens), played one per event-loop turn
so that a stream sees them arrive one by one. It records what was submitted and what was aborted."""

from __future__ import annotations

import asyncio
import itertools
from array import array
from collections.abc import Callable

from ringllm.app.engine_client import EngineBusy, EngineDown, Submission
from ringllm.ipc import messages as m
from ringllm.ipc.shared_table import COLUMNS

LOGPROB, PROMPT_LOGPROB = -0.5, -1.0  # what the fake reports for every generated / prompt token
PROMPT_RANK = 1  # and the rank it gives every prompt token


class FakeEngine:
    def __init__(self, tokenizer, text: str = "Once upon a time there was a function"):
        self.tokenizer = tokenizer
        self.reply: Callable[[list[int], m.Sampling], list] = self.text_reply(text)
        self.submitted: list[tuple[str, list[int], m.Sampling]] = []
        self.aborted: list[str] = []
        self.refuse: Exception | None = None  # EngineDown or EngineBusy, raised by the next submits
        self._plays: dict[str, asyncio.Task] = {}
        self._ids = itertools.count()

    async def submit(self, token_ids: list[int], sampling: m.Sampling) -> Submission:
        if self.refuse is not None:
            raise self.refuse
        rid = f"fake-{next(self._ids)}"
        self.submitted.append((rid, list(token_ids), sampling))
        outputs: asyncio.Queue = asyncio.Queue()
        items = [_with_rid(item, rid) for item in self.reply(list(token_ids), sampling)]
        self._plays[rid] = asyncio.create_task(_play(items, outputs))
        return Submission(rid, outputs, lambda: self._abort(rid))

    def _abort(self, rid: str) -> None:
        self.aborted.append(rid)
        self._plays[rid].cancel()

    def text_reply(self, text: str, finish: str = "stop", hang: bool = False):
        """Replies with `text`'s tokens, one per delta: cut at max_tokens ("length"), else ending with `finish`
        (or, with `hang`, never ending: a request only the client, a timeout or a stop string ends)."""

        def reply(ids: list[int], sampling: m.Sampling) -> list:
            tokens = self.tokenizer.encode(text)
            reason = "length" if len(tokens) >= sampling.max_tokens else finish
            tokens = tokens[: sampling.max_tokens]
            items = [delta([t], sampling) for t in tokens]
            if not hang:
                items[-1].finish_reason = reason
            if sampling.prompt_logprobs is not None:
                k = sampling.prompt_logprobs
                items[0].prompt_logprobs = [PROMPT_LOGPROB] * (len(ids) - 1)
                items[0].prompt_top_logprobs = [[(t, PROMPT_LOGPROB)] * k for t in ids[1:]]
                items[0].prompt_ranks = [PROMPT_RANK] * (len(ids) - 1)
            return items

        return reply


def delta(tokens: list[int], sampling: m.Sampling | None = None, finish: str | None = None) -> m.TokenDelta:
    """A delta as the engine sends it (its rid is set when it is played); logprobs when the sampling asks."""
    item = m.TokenDelta("", m.pack_ids(tokens), finish)
    if sampling is not None and sampling.logprobs is not None:
        item.logprobs = [LOGPROB] * len(tokens)
        item.top_logprobs = [[(t, LOGPROB)] * sampling.logprobs for t in tokens]
    return item


def _with_rid(item, rid: str):
    item.rid = rid
    return item


async def _play(items: list, outputs: asyncio.Queue) -> None:
    for item in items:
        await asyncio.sleep(0)
        outputs.put_nowait(item)


class MemoryTable:
    """The metrics table (ipc/shared_table.py) in this process's memory: one row, as one API worker has."""

    def __init__(self, rows: int = 1):
        self.values = memoryview(array("d", [0.0] * (rows * COLUMNS)))

    def row(self, index: int) -> memoryview:
        return self.values[index * COLUMNS : (index + 1) * COLUMNS]

    def totals(self) -> list[float]:
        flat = self.values.tolist()
        return [sum(flat[c::COLUMNS]) for c in range(COLUMNS)]


__all__ = ["EngineBusy", "EngineDown", "FakeEngine", "MemoryTable", "delta"]
