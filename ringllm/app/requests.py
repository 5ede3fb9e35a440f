"""A request's life between the serving objects and the engine: submit each generation (prompt × choice), turn
its token deltas into text pieces (text/stream.py: detokenizing, stop strings), enforce --request-timeout, fan
several choices out and back in, and abort in the engine whatever the client no longer waits for.

The engine is reached through `EngineConnection`: the replicas' ring clients (app/replicas.py) when serving,
a scripted fake in the unit tests (tests/app/fake_engine.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, NamedTuple, Protocol

import msgspec

from ringllm.app.engine_client import EngineBusy, EngineDown, Submission
from ringllm.app.errors import ApiError
from ringllm.app.metrics import Metrics
from ringllm.engine.logs import get_logger
from ringllm.ipc import messages as m
from ringllm.text.stream import TextStream
from ringllm.text.tokenizer import Tokenizer

log = get_logger("app")

# (token id, its logprob, the top (id, logprob) pairs); an echoed prompt's first token has neither
TokenLogprobs = tuple[int, float | None, list[tuple[int, float]] | None]
# (prompt token id, its logprob, its rank, the top (id, logprob) pairs) of prompt tokens 1, 2, ...
PromptTokenLogprobs = tuple[int, float, int, list[tuple[int, float]]]


class EngineConnection(Protocol):
    async def submit(self, token_ids: list[int], sampling: m.Sampling) -> Submission:
        """Sends one generation to an engine that can serve it now (raises EngineDown or EngineBusy)."""
        ...


class Job(NamedTuple):
    """One generation: a prompt, its sampling parameters, and the prompt text to echo first (or None)."""

    ids: list[int]
    sampling: m.Sampling
    echo: str | None = None


class Output(NamedTuple):
    """A piece of one choice: its new text, its finish reason once it ended, its completion tokens so far,
    the logprobs of the tokens in this piece, in the first piece of a request that asked for them the prompt
    logprobs, the token ids of this piece, and (in the first piece) how many prompt tokens the prefix cache
    served."""

    choice: int
    text: str
    finish_reason: str | None
    tokens: int
    logprobs: list[TokenLogprobs]
    prompt: list[PromptTokenLogprobs] | None = None
    token_ids: list[int] = []
    cached_tokens: int = 0


class Choice(NamedTuple):
    """One choice of a request run to its end."""

    text: str
    finish_reason: str | None
    tokens: int
    logprobs: list[TokenLogprobs]
    prompt: list[PromptTokenLogprobs] | None  # with prompt_logprobs
    token_ids: list[int]
    cached_tokens: int  # prompt tokens served by the prefix cache


class Generations:
    """Runs generations against the engine for every route; one per API worker."""

    def __init__(
        self,
        engine: EngineConnection,
        tokenizer: Tokenizer | None,  # None: no text (--skip-tokenizer-init), token ids only
        metrics: Metrics,
        request_timeout: float | None = None,
        max_waiting_requests: int = 4096,
    ):
        self.engine, self.tokenizer, self.metrics = engine, tokenizer, metrics
        self.timeout, self.max_waiting = request_timeout, max_waiting_requests

    def jobs(
        self, ids_list: list[list[int]], sampling: m.Sampling, n: int, echoes: list[str] | None = None
    ) -> list[Job]:
        """One job per prompt and choice; with a seed, choice j uses seed + j (wrapped within 64 bits) so the
        choices differ. More jobs than the engine's queue holds could never all be queued: that is a 400."""
        if len(ids_list) * n > self.max_waiting:
            raise ApiError(
                400,
                f"{len(ids_list)} prompts × n={n} make {len(ids_list) * n} generations; this "
                f"server queues at most {self.max_waiting} (--max-waiting-requests)",
                param="n",
            )
        jobs = []
        for p, ids in enumerate(ids_list):
            for j in range(n):
                sp = sampling
                if sampling.seed is not None and j > 0:
                    sp = msgspec.structs.replace(sampling, seed=_choice_seed(sampling.seed, j))
                jobs.append(Job(ids, sp, echoes[p] if echoes else None))
        self.metrics.taken(len(ids_list), n, sampling.max_tokens)
        return jobs

    async def stream(self, jobs: list[Job]) -> AsyncIterator[Output]:
        """Runs several generations at once (prompts × n) and yields their pieces as they arrive from any of
        them. Leaving early aborts those still running."""
        if len(jobs) == 1:  # the common case needs no tasks or queue hop
            async for out in self._pieces(0, jobs[0]):
                yield out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def drive(index: int, job: Job) -> None:
            try:
                async for out in self._pieces(index, job):
                    await queue.put(out)
            except ApiError as e:
                await queue.put(e)
            except Exception as e:  # never leave the request waiting for a choice that died
                log.exception("a choice failed", error=str(e))
                await queue.put(ApiError(500, "internal error", "server_error"))

        tasks = [asyncio.create_task(drive(i, job)) for i, job in enumerate(jobs)]
        try:
            done = 0
            while done < len(jobs):
                item = await queue.get()
                if isinstance(item, ApiError):
                    raise item
                done += item.finish_reason is not None
                yield item
        finally:
            for t in tasks:
                t.cancel()

    async def collect(self, jobs: list[Job], disconnected: Callable[[], Coroutine[Any, Any, None]]) -> list[Choice]:
        """Runs a non-streaming request to its end, or aborts it in the engine once `disconnected()` returns
        (the client went away: a 499 nobody reads)."""
        texts, counts = [""] * len(jobs), [0] * len(jobs)
        reasons: list[str | None] = [None] * len(jobs)
        lps: list[list[TokenLogprobs]] = [[] for _ in jobs]
        prompts: list[list[PromptTokenLogprobs] | None] = [None] * len(jobs)
        ids: list[list[int]] = [[] for _ in jobs]
        cached = [0] * len(jobs)

        async def gather() -> None:
            async for out in self.stream(jobs):
                texts[out.choice] += out.text
                reasons[out.choice], counts[out.choice] = out.finish_reason, out.tokens
                lps[out.choice] += out.logprobs
                prompts[out.choice] = prompts[out.choice] or out.prompt
                ids[out.choice] += out.token_ids
                cached[out.choice] = max(cached[out.choice], out.cached_tokens)

        work, watch = asyncio.create_task(gather()), asyncio.create_task(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not work.done():
            work.cancel()  # the client left: cancelling aborts every choice in the engine
            raise ApiError(499, "client disconnected")
        work.result()
        return [Choice(*choice) for choice in zip(texts, reasons, counts, lps, prompts, ids, cached)]

    async def _pieces(self, choice: int, job: Job) -> AsyncIterator[Output]:
        """Yields one choice's pieces as tokens arrive; tokens that arrived together make one piece, except
        with logprobs, where each token is a piece of its own (as vLLM streams them: a chunk per token, with
        that token's logprobs and text, "" while a character is incomplete). With `job.echo` the first piece
        starts with the prompt (and its tokens' logprobs, the first one None). Whatever ends the request
        before the engine does (a stop string, the timeout, a consumer that went away) aborts it in the
        engine: it stops generating and frees its KV."""
        try:
            sub = await self.engine.submit(job.ids, job.sampling)
        except (EngineDown, EngineBusy) as e:
            raise ApiError(503, str(e), "server_error") from None
        text = TextStream(self.tokenizer, job.ids, job.sampling.stop, job.sampling.min_tokens)
        count, engine_done, refused = 0, False, False  # engine_done: it finished or failed the request, or aborted
        start, last, ttft = time.perf_counter(), None, None
        try:
            while not text.finished:
                items = await self._next_items(sub.outputs, start)
                first = last is None
                prompt = _prompt_logprobs(job.ids, items[0]) if first else None
                k = job.sampling.logprobs
                lps = [] if job.echo is None or prompt is None or k is None else _echoed_logprobs(job.ids, prompt, k)
                try:
                    new, reason, rows = _tokens(items)
                except ApiError as e:
                    engine_done = True  # the engine failed the request: nothing to abort
                    refused = e.status < 500  # the client's (an uncompilable grammar): not a request that ran
                    raise
                engine_done = reason is not None
                now = time.perf_counter()
                if last is None:
                    ttft = now - start
                    self.metrics.ttft.observe(ttft)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                groups = _groups(new, rows, per_token=k is not None)
                for at, (group, group_rows) in enumerate(groups):
                    if text.finished:  # a stop string in an earlier token: the rest is not the answer's
                        break
                    count += len(group)
                    piece = text.feed(group, reason if at == len(groups) - 1 else None)
                    if piece.abort and not engine_done:  # a stop string: the engine would generate on
                        sub.abort()
                    engine_done = engine_done or piece.abort
                    lead, head = (job.echo or "") if first and at == 0 else "", at == 0
                    yield Output(
                        choice,
                        lead + piece.text,
                        piece.finish_reason,
                        count,
                        lps + group_rows if head else group_rows,
                        prompt if head else None,
                        group,
                        _cached_tokens(items) if first and head else 0,
                    )
        finally:
            if not engine_done:
                sub.abort()
            reason = text.finish_reason or "abort"
            total = time.perf_counter() - start
            if not refused:
                self.metrics.finished(reason, len(job.ids), total)
            log.info(
                "request",
                rid=sub.rid,
                prompt_tokens=len(job.ids),
                completion_tokens=count,
                finish_reason=reason,
                ttft_s=round(ttft, 4) if ttft is not None else None,
                total_s=round(total, 4),
            )

    async def _next_items(self, outputs: asyncio.Queue, start: float) -> list:
        """What the engine sent since the last look (at least one item), or a 504 once the request has run past
        --request-timeout (the caller aborts it)."""
        if self.timeout is None:
            items = [await outputs.get()]
        else:
            try:
                items = [await asyncio.wait_for(outputs.get(), max(0.0, start + self.timeout - time.perf_counter()))]
            except asyncio.TimeoutError:
                raise ApiError(
                    504, f"the request ran past the server's request timeout of {self.timeout:g} s", "timeout_error"
                ) from None
        while not outputs.empty():
            items.append(outputs.get_nowait())
        return items


def _tokens(items: list) -> tuple[list[int], str | None, list[TokenLogprobs]]:
    """The new token ids of the engine's items, their finish reason and their logprobs (where the request asked
    for them). An item that failed the request raises its error."""
    new: list[int] = []
    rows: list[TokenLogprobs] = []
    reason = None
    for item in items:
        if isinstance(item, m.RequestFailed):
            kind = "server_error" if item.status >= 500 else "invalid_request_error"
            raise ApiError(item.status, item.message, kind)
        got = m.unpack_ids(item.token_ids)
        new += got
        reason = reason or item.finish_reason
        if item.logprobs is not None:
            tops = item.top_logprobs or [[] for _ in got]
            rows += list(zip(got, item.logprobs, tops))
    return new, reason, rows


def _groups(new: list[int], rows: list[TokenLogprobs], per_token: bool) -> list[tuple[list[int], list[TokenLogprobs]]]:
    """The pieces these tokens make, each with its tokens' logprobs: one per token with `per_token` (the
    request asked for logprobs, which the engine then sends for every token), else one for them all."""
    if not per_token or len(new) < 2 or len(rows) != len(new):
        return [(new, rows)]
    return [([token], [row]) for token, row in zip(new, rows)]


def _cached_tokens(items: list) -> int:
    """How many prompt tokens the engine found in its prefix cache, as its first delta says."""
    first = items[0]
    return first.cached_tokens if isinstance(first, m.TokenDelta) else 0


def _prompt_logprobs(ids: list[int], first) -> list[PromptTokenLogprobs] | None:
    """(token, logprob, rank, top) for prompt tokens 1, 2, ..., from the engine's prompt logprobs that came with
    the first generated token (None when the request did not ask)."""
    if not isinstance(first, m.TokenDelta) or first.prompt_logprobs is None:
        return None
    assert first.prompt_top_logprobs is not None and first.prompt_ranks is not None  # the engine sends all three
    return list(zip(ids[1:], first.prompt_logprobs, first.prompt_ranks, first.prompt_top_logprobs))


def _echoed_logprobs(ids: list[int], prompt: list[PromptTokenLogprobs], k: int) -> list[TokenLogprobs]:
    """(token, logprob, top k) for each prompt token of an echo; the first prompt token has no context, so no
    logprob."""
    rows: list[TokenLogprobs] = [(ids[0], None, None)]
    return rows + [(t, lp, top[:k]) for t, lp, _, top in prompt]


def _choice_seed(seed: int, j: int) -> int:
    """seed + j as a signed 64-bit integer: 2**63 - 1 + 1 wraps to -2**63 instead of overflowing."""
    return (seed + j + 2**63) % 2**64 - 2**63
