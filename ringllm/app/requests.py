"""A request's life between the HTTP route and the engine: submit each generation (prompt × choice), turn
its token deltas into text pieces (detokenizing, matching stop strings, enforcing --request-timeout), fan
several choices out and back in, and abort in the engine whatever the client no longer waits for."""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

import msgspec
from litestar import Request

from ringllm.app.engine_client import EngineBusy, EngineDown
from ringllm.app.errors import ApiError
from ringllm.engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from ringllm.engine.logs import get_logger
from ringllm.ipc import messages as m

log = get_logger("app")


OFF_LOOP_CHARS = 16_384  # longer texts are tokenized on a thread: 5 MiB takes seconds


async def tokenize_text(
    request: Request,
    text: str,
    add_special_tokens: bool = False,
    encode=None,
    bound: bool = True,
    param: str = "prompt",
) -> list[int]:
    """The token ids of a prompt text. A text longer than the context could hold even at the tokenizer's
    longest token is refused before tokenizing (with `bound`); a long text is tokenized off the event loop, so
    the worker goes on serving (and answering /health) meanwhile. `encode` replaces the tokenizer's."""
    tok, settings = request.app.state.tokenizer, request.app.state.settings
    limit = settings.max_seq_len * request.app.state.max_token_chars
    if bound and len(text) > limit:
        raise ApiError(
            400,
            f"the prompt has {len(text)} characters: more than the context of "
            f"{settings.max_seq_len} tokens can hold ({limit} characters at most)",
            param=param,
        )
    encode = encode or tok.encode
    if len(text) < OFF_LOOP_CHARS:
        return encode(text, add_special_tokens) if add_special_tokens else encode(text)
    if add_special_tokens:
        return await asyncio.to_thread(encode, text, add_special_tokens)
    return await asyncio.to_thread(encode, text)


class Job(NamedTuple):
    """One generation: a prompt, its sampling parameters, and the prompt text to echo first (or None)."""

    ids: list[int]
    sampling: m.Sampling
    echo: str | None = None


async def _pieces(request: Request, job: Job, stops: list[str]):
    """Yields (text, finish_reason, completion_tokens, logprobs) as tokens arrive; tokens that arrived
    together make one piece. With `job.echo` the first piece starts with the prompt (and its tokens'
    logprobs, the first one None). Whatever ends the request before the engine does (a stop string, the
    timeout, a consumer that went away) aborts it in the engine: it stops generating and frees its KV."""
    ids, sampling = job.ids, job.sampling
    tok = request.app.state.tokenizer
    try:
        client = request.app.state.replicas.pick(ids)  # with --dp-size 1 the one engine
        rid = client.new_rid()
        queue = await client.submit(rid, ids, sampling)
    except (EngineDown, EngineBusy) as e:
        raise ApiError(503, str(e), "server_error") from None
    detok, matcher = IncrementalDetokenizer(tok, ids), StopStringMatcher(stops)
    count, finished, reason = 0, False, None
    engine_done = False  # the engine finished or failed the request itself: nothing to abort
    metrics, start, last, ttft = request.app.state.metrics, time.perf_counter(), None, None
    limit = request.app.state.settings.request_timeout
    try:
        while not finished:
            items = [await _next(queue, None if limit is None else start + limit - time.perf_counter(), limit)]
            while not queue.empty():
                items.append(queue.get_nowait())
            new, reason, lps = [], None, []
            if job.echo is not None and last is None:
                lps = _echoed_logprobs(ids, items[0]) if sampling.logprobs is not None else []
            for item in items:
                if isinstance(item, m.RequestFailed):
                    finished = engine_done = True
                    raise ApiError(
                        item.status, item.message, "server_error" if item.status >= 500 else "invalid_request_error"
                    )
                got = m.unpack_ids(item.token_ids)
                new += got
                reason = reason or item.finish_reason
                if item.logprobs is not None:
                    tops = item.top_logprobs or [[] for _ in got]
                    lps += list(zip(got, item.logprobs, tops))
            count += len(new)
            engine_done = reason is not None
            text = detok.add(new) + (detok.flush() if reason else "")
            out = matcher.feed(text)
            if matcher.stopped:
                reason = "stop"
                if not engine_done:  # the engine does not see stop strings: it would generate on
                    client.abort(rid)
                    engine_done = True
            elif reason:
                out += matcher.flush()
            finished = reason is not None
            now = time.perf_counter()
            if last is None:
                out = (job.echo or "") + out
                ttft = now - start
                metrics.ttft.observe(ttft)
            else:
                metrics.itl.observe(now - last)
            last = now
            yield out, reason, count, lps
    finally:
        if not engine_done:
            client.abort(rid)
        if not finished:
            reason = "abort"
        total = time.perf_counter() - start
        metrics.finished(reason or "error", len(ids), total)
        log.info(
            "request",
            rid=rid,
            prompt_tokens=len(ids),
            completion_tokens=count,
            finish_reason=reason,
            ttft_s=round(ttft, 4) if ttft is not None else None,
            total_s=round(total, 4),
        )


def _echoed_logprobs(ids: list[int], first) -> list:
    """(token, logprob, top) for each prompt token, from the engine's prompt logprobs that came with the
    first generated token; the first prompt token has no context, so no logprob."""
    if not isinstance(first, m.TokenDelta) or first.prompt_logprobs is None:
        return []
    assert first.prompt_top_logprobs is not None  # the engine sends both together
    rows: list[tuple[int, float | None, list[tuple[int, float]] | None]] = [(ids[0], None, None)]
    return rows + list(zip(ids[1:], first.prompt_logprobs, first.prompt_top_logprobs))


async def _next(queue: asyncio.Queue, remaining: float | None, limit: float | None):
    """The next item for a request, or a 504 once it has run past --request-timeout (the caller aborts it)."""
    if remaining is None:
        return await queue.get()
    try:
        return await asyncio.wait_for(queue.get(), max(0.0, remaining))
    except asyncio.TimeoutError:
        raise ApiError(
            504, f"the request ran past the server's request timeout of {limit:g} s", "timeout_error"
        ) from None


async def fan_out(request: Request, jobs: list[Job], stops: list[str]):
    """Runs several generations at once (prompts × n) and yields (choice index, text, finish_reason, count)
    as pieces arrive from any of them. Leaving early aborts those still running."""
    if len(jobs) == 1:  # the common case needs no tasks or queue hop
        async for text, reason, count, lps in _pieces(request, jobs[0], stops):
            yield 0, text, reason, count, lps
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def drive(index, job):
        try:
            async for text, reason, count, lps in _pieces(request, job, stops):
                await queue.put((index, text, reason, count, lps))
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
            done += item[2] is not None
            yield item
    finally:
        for t in tasks:
            t.cancel()


def make_jobs(
    request: Request, ids_list: list[list[int]], sampling: m.Sampling, n: int, echoes: list[str] | None = None
) -> list[Job]:
    """One job per prompt and choice; with a seed, choice j uses seed + j (wrapped within 64 bits) so the
    choices differ. More jobs than the engine's queue holds could never all be queued: that is a 400."""
    limit = request.app.state.settings.max_waiting_requests
    if len(ids_list) * n > limit:
        raise ApiError(
            400,
            f"{len(ids_list)} prompts × n={n} make {len(ids_list) * n} generations; this "
            f"server queues at most {limit} (--max-waiting-requests)",
            param="n",
        )
    jobs = []
    for p, ids in enumerate(ids_list):
        for j in range(n):
            sp = (
                sampling
                if sampling.seed is None or j == 0
                else msgspec.structs.replace(sampling, seed=_choice_seed(sampling.seed, j))
            )
            jobs.append(Job(ids, sp, echoes[p] if echoes else None))
    return jobs


def _choice_seed(seed: int, j: int) -> int:
    """seed + j as a signed 64-bit integer: 2**63 - 1 + 1 wraps to -2**63 instead of overflowing."""
    return (seed + j + 2**63) % 2**64 - 2**63


async def _until_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already; only that event is left)."""
    message = await request.receive()
    while message["type"] != "http.disconnect":
        message = await request.receive()


async def collect(request: Request, jobs, stops, n: int):
    """Runs a non-streaming request to its end, or aborts it in the engine if the client goes away first.
    Returns per-choice (texts, reasons, counts, logprobs)."""
    texts, reasons, counts = [""] * n, [None] * n, [0] * n
    lps_all: list[list] = [[] for _ in range(n)]

    async def gather():
        async for index, text, reason, count, lps in fan_out(request, jobs, stops):
            texts[index] += text
            reasons[index], counts[index] = reason, count
            lps_all[index] += lps

    work, watch = asyncio.create_task(gather()), asyncio.create_task(_until_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not work.done():
        work.cancel()  # the client left: cancelling aborts every choice in the engine
        raise ApiError(499, "client disconnected")
    work.result()
    return texts, reasons, counts, lps_all
