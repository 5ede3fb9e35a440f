"""The Litestar app each Granian worker runs. Settings come from the environment that `ringllm serve` sets
for its workers (RINGLLM_ENGINE_PID, RINGLLM_WORKERS, RINGLLM_MODEL_PATH, RINGLLM_SERVED_MODEL,
RINGLLM_MAX_SEQ_LEN, RINGLLM_API_KEY, RINGLLM_PUBLIC_ROUTES, RINGLLM_REQUEST_TIMEOUT)."""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from contextlib import asynccontextmanager
from typing import NamedTuple

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException, ValidationException
from litestar.response import Stream

from app.engine_client import EngineClient, EngineDown
from app.metrics import Metrics
from app.schemas import (ChatChoice, ChatChunk, ChatLogprobs, ChatMessageOut, ChatRequest, ChatResponse,
                         ChatStreamChoice, CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                         ErrorBody, ErrorResponse, TokenLogprob, TopLogprob, Usage, MAX_PROMPTS)
from app.tokenizer import AppTokenizer
from engine.detokenize import IncrementalDetokenizer, StopStringMatcher
from engine.logs import configure_logging, get_logger
from engine.sampling_params import SamplingParams
from ipc import messages as m
from ipc.lifecycle import open_metrics_table

log = get_logger("app")
_json = msgspec.json.Encoder()


MAX_BODY_BYTES = 8 << 20  # larger bodies get 413
RETRY_AFTER_SECONDS = "1"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> Response:
    body = ErrorResponse(ErrorBody(message, kind, param, None))
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None  # overload or restart: come back
    return Response(_json.encode(body), status_code=status, media_type="application/json", headers=headers)


class Settings:
    def __init__(self):
        env = os.environ
        self.engine_pid = int(env["RINGLLM_ENGINE_PID"])
        self.workers = int(env.get("RINGLLM_WORKERS", "1"))
        self.model_path = env["RINGLLM_MODEL_PATH"]
        self.served_model = env.get("RINGLLM_SERVED_MODEL", "ringllm")
        self.max_seq_len = int(env.get("RINGLLM_MAX_SEQ_LEN", "4096"))
        self.api_key = env.get("RINGLLM_API_KEY") or None
        self.vocab_size = int(env.get("RINGLLM_VOCAB_SIZE", "0"))  # the model's; its tokenizer may know fewer
        self.public_routes = set(filter(None, env.get("RINGLLM_PUBLIC_ROUTES", "/health,/metrics").split(",")))
        timeout = float(env.get("RINGLLM_REQUEST_TIMEOUT") or 0)
        self.request_timeout = timeout if timeout > 0 else None


@asynccontextmanager
async def lifespan(app: Litestar):
    configure_logging(os.environ.get("RINGLLM_LOG_LEVEL", "info"))
    s = Settings()
    app.state.settings = s
    app.state.tokenizer = AppTokenizer(s.model_path)
    app.state.client = EngineClient(s.engine_pid, s.workers)
    table = open_metrics_table(s.engine_pid)
    app.state.metrics = Metrics(table, app.state.client.index)
    log.info("app worker ready", worker=app.state.client.index, pid=os.getpid())
    try:
        yield
    finally:
        app.state.client.close()
        table.close()


# ---- helpers ----
def _check_auth(request: Request) -> None:
    settings = request.app.state.settings
    key = settings.api_key
    if key is None or request.url.path in settings.public_routes:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "invalid or missing API key", "authentication_error")


def _check_model(request: Request, model: str | None) -> None:
    served = request.app.state.settings.served_model
    if model is not None and model != served:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {served!r}", "not_found_error", "model")


def _sampling(req, max_tokens: int | None, default_max_tokens: int | None, prompt_len: int, max_seq_len: int,
              logprobs: int | None = None) -> tuple[m.Sampling, list[str]]:
    """The wire sampling parameters of a request (its bounds were checked as it was decoded). An explicit
    max_tokens must fit the context after the prompt; without one, the default (or everything the context
    has left) is used."""
    room = max_seq_len - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; the context holds {max_seq_len}", param="messages")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens} plus the prompt's {prompt_len} tokens exceed the context of "
                            f"{max_seq_len} tokens", param="max_tokens")
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    params = dict(max_tokens=max_tokens, temperature=req.temperature,
                  top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, seed=req.seed,
                  repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                  frequency_penalty=req.frequency_penalty, ignore_eos=req.ignore_eos,
                  stop_token_ids=list(req.stop_token_ids or []), logprobs=logprobs)
    try:
        SamplingParams(**params, stop=stops)
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split()[0]) from None
    return m.Sampling(**params), stops


class Job(NamedTuple):
    """One generation: a prompt, its sampling parameters, and the prompt text to echo first (or None)."""

    ids: list[int]
    sampling: m.Sampling
    echo: str | None = None


async def _pieces(request: Request, job: Job, stops: list[str]):
    """Yields (text, finish_reason, completion_tokens, logprobs) as tokens arrive; tokens that arrived
    together make one piece. With `job.echo` the first piece starts with the prompt (and its tokens'
    logprobs, the first one None). Aborts the request in the engine if the consumer goes away first."""
    ids, sampling = job.ids, job.sampling
    client, tok = request.app.state.client, request.app.state.tokenizer
    rid = client.new_rid()
    try:
        queue = client.submit(rid, ids, sampling)
    except EngineDown as e:
        raise ApiError(503, str(e), "server_error") from None
    detok, matcher = IncrementalDetokenizer(tok, ids), StopStringMatcher(stops)
    count, finished, reason = 0, False, None
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
                    finished = True
                    raise ApiError(item.status, item.message, "server_error" if item.status >= 500 else
                                   "invalid_request_error")
                got = m.unpack_ids(item.token_ids)
                new += got
                reason = reason or item.finish_reason
                if item.logprobs is not None:
                    tops = item.top_logprobs or [[] for _ in got]
                    lps += list(zip(got, item.logprobs, tops))
            count += len(new)
            text = detok.add(new) + (detok.flush() if reason else "")
            out = matcher.feed(text)
            if matcher.stopped:
                reason = "stop"
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
        if not finished:
            client.abort(rid)
            reason = "abort"
        total = time.perf_counter() - start
        metrics.finished(reason or "error", len(ids), total)
        log.info("request", rid=rid, prompt_tokens=len(ids), completion_tokens=count, finish_reason=reason,
                 ttft_s=round(ttft, 4) if ttft is not None else None, total_s=round(total, 4))


def _echoed_logprobs(ids: list[int], first) -> list:
    """(token, logprob, top) for each prompt token, from the engine's prompt logprobs that came with the
    first generated token; the first prompt token has no context, so no logprob."""
    if not isinstance(first, m.TokenDelta) or first.prompt_logprobs is None:
        return []
    return [(ids[0], None, None)] + list(zip(ids[1:], first.prompt_logprobs, first.prompt_top_logprobs))


async def _next(queue: asyncio.Queue, remaining: float | None, limit: float | None):
    """The next item for a request, or a 504 once it has run past --request-timeout (the caller aborts it)."""
    if remaining is None:
        return await queue.get()
    try:
        return await asyncio.wait_for(queue.get(), max(0.0, remaining))
    except asyncio.TimeoutError:
        raise ApiError(504, f"the request ran past the server's request timeout of {limit:g} s",
                       "timeout_error") from None


async def _fan_out(request: Request, jobs: list[Job], stops: list[str]):
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


def _jobs(ids_list: list[list[int]], sampling: m.Sampling, n: int, echoes: list[str] | None = None) -> list[Job]:
    """One job per prompt and choice; with a seed, choice j uses seed + j so the choices differ."""
    jobs = []
    for p, ids in enumerate(ids_list):
        for j in range(n):
            sp = sampling if sampling.seed is None or j == 0 else msgspec.structs.replace(sampling, seed=sampling.seed + j)
            jobs.append(Job(ids, sp, echoes[p] if echoes else None))
    return jobs


async def _until_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already; only that event is left)."""
    message = await request.receive()
    while message["type"] != "http.disconnect":
        message = await request.receive()


async def _collect(request: Request, jobs, stops, n: int):
    """Runs a non-streaming request to its end, or aborts it in the engine if the client goes away first.
    Returns per-choice (texts, reasons, counts, logprobs)."""
    texts, reasons, counts, lps_all = [""] * n, [None] * n, [0] * n, [[] for _ in range(n)]

    async def gather():
        async for index, text, reason, count, lps in _fan_out(request, jobs, stops):
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


def _token_text(tok, tid: int) -> str:
    return tok.decode([tid], skip_special_tokens=False)


def _completion_logprobs(tok, lps) -> CompletionLogprobs:
    return CompletionLogprobs([_token_text(tok, t) for t, _, _ in lps], [lp for _, lp, _ in lps],
                              [None if top is None else {_token_text(tok, i): v for i, v in top} for _, _, top in lps])


def _chat_logprobs(tok, lps) -> ChatLogprobs:
    def one(tid, lp, top):
        text = _token_text(tok, tid)
        tops = [TopLogprob(_token_text(tok, i), v, list(_token_text(tok, i).encode())) for i, v in top]
        return TokenLogprob(text, lp, list(text.encode()), tops)

    return ChatLogprobs([one(*x) for x in lps])


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt, completion, prompt + completion)


def _sse(obj) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


async def _sse_stream(events):
    """Passes SSE frames through; a failure after the response started becomes a final error event."""
    try:
        async for frame in events:
            yield frame
    except ApiError as e:
        yield _sse(ErrorResponse(ErrorBody(e.message, e.kind, e.param, None)))


# ---- routes ----
@post("/v1/completions", status_code=200)
async def completions(request: Request, data: CompletionRequest) -> Response | Stream:
    _check_auth(request)
    _check_model(request, data.model)
    s, tok = request.app.state.settings, request.app.state.tokenizer
    prompts = _prompt_list(data.prompt)
    vocab = s.vocab_size or tok.vocab_size
    ids_list = [tok.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    for ids in ids_list:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
    longest = max(len(ids) for ids in ids_list)
    sampling, stops = _sampling(data, data.max_tokens, 16, longest, s.max_seq_len, data.logprobs)
    want_lp = data.logprobs is not None
    echoes = None
    if data.echo:  # the prompt comes back before the completion, with its tokens' logprobs if asked for
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=data.logprobs)
        echoes = [p if isinstance(p, str) else tok.decode(ids) for p, ids in zip(prompts, ids_list)]
    jobs = _jobs(ids_list, sampling, data.n, echoes)
    prompt_tokens = sum(len(ids) for ids in ids_list)
    rid, created, model = f"cmpl-{os.urandom(8).hex()}", int(time.time()), s.served_model
    if data.stream:
        async def events():
            counts = [0] * len(jobs)
            async for index, text, reason, count, lps in _fan_out(request, jobs, stops):
                counts[index] = count
                lp = _completion_logprobs(tok, lps) if want_lp else None
                yield _sse(CompletionResponse(rid, created, model, [CompletionChoice(index, text, reason, lp)]))
            if data.stream_options and data.stream_options.include_usage:
                yield _sse(CompletionResponse(rid, created, model, [], _usage(prompt_tokens * data.n, sum(counts))))
            yield b"data: [DONE]\n\n"

        return Stream(_sse_stream(events()), media_type="text/event-stream")
    texts, reasons, counts, all_lps = await _collect(request, jobs, stops, len(jobs))
    choices = [CompletionChoice(i, texts[i], reasons[i], _completion_logprobs(tok, all_lps[i]) if want_lp else None)
               for i in range(len(jobs))]
    body = CompletionResponse(rid, created, model, choices, _usage(prompt_tokens * data.n, sum(counts)))
    return Response(_json.encode(body), media_type="application/json")


def _prompt_list(prompt) -> list:
    """The request's prompts: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    kinds = {type(x) for x in prompt}
    if len(kinds) > 1:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists "
                            "of token ids", param="prompt")
    if not prompt or kinds == {int}:
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    return list(prompt)


@post("/v1/chat/completions", status_code=200)
async def chat(request: Request, data: ChatRequest) -> Response | Stream:
    _check_auth(request)
    _check_model(request, data.model)
    s, tok = request.app.state.settings, request.app.state.tokenizer
    try:
        text = tok.apply_chat_template([{"role": x.role, "content": x.content} for x in data.messages])
    except Exception as e:  # a template that rejects the conversation
        raise ApiError(400, f"chat template failed: {e}", param="messages") from None
    ids = tok.encode(text)
    max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    want_lp = data.logprobs
    sampling, stops = _sampling(data, max_tokens, None, len(ids), s.max_seq_len,
                                (data.top_logprobs or 0) if want_lp else None)
    jobs = _jobs([ids], sampling, data.n)
    rid, created, model = f"chatcmpl-{os.urandom(8).hex()}", int(time.time()), s.served_model
    if data.stream:
        async def events():
            first = [ChatStreamChoice(i, ChatMessageOut(role="assistant", content=""), None) for i in range(len(jobs))]
            yield _sse(ChatChunk(rid, created, model, first))
            counts = [0] * len(jobs)
            async for index, piece, reason, count, lps in _fan_out(request, jobs, stops):
                counts[index] = count
                lp = _chat_logprobs(tok, lps) if want_lp else None
                yield _sse(ChatChunk(rid, created, model, [ChatStreamChoice(index, ChatMessageOut(content=piece), reason,
                                                                            lp)]))
            if data.stream_options and data.stream_options.include_usage:
                yield _sse(ChatChunk(rid, created, model, [], _usage(len(ids) * data.n, sum(counts))))
            yield b"data: [DONE]\n\n"

        return Stream(_sse_stream(events()), media_type="text/event-stream")
    texts, reasons, counts, all_lps = await _collect(request, jobs, stops, len(jobs))
    choices = [ChatChoice(i, ChatMessageOut("assistant", texts[i]), reasons[i],
                          _chat_logprobs(tok, all_lps[i]) if want_lp else None) for i in range(len(jobs))]
    body = ChatResponse(rid, created, model, choices, _usage(len(ids) * data.n, sum(counts)))
    return Response(_json.encode(body), media_type="application/json")


@get("/v1/models")
async def models(request: Request) -> dict:
    _check_auth(request)
    s = request.app.state.settings
    return {"object": "list", "data": [{"id": s.served_model, "object": "model", "created": 0, "owned_by": "ringllm",
                                        "max_model_len": s.max_seq_len}]}


@get("/metrics")
async def metrics(request: Request) -> Response:
    _check_auth(request)
    try:
        engine = await request.app.state.client.stats()
    except (EngineDown, asyncio.TimeoutError):
        engine = {}
    return Response(request.app.state.metrics.render(engine), media_type="text/plain; version=0.0.4")


@post("/start_profile", status_code=200)
async def start_profile(request: Request) -> dict:
    _check_auth(request)
    await request.app.state.client.stats("profile_start")
    return {"profiling": True}


@post("/stop_profile", status_code=200)
async def stop_profile(request: Request) -> dict:
    """Stops the engine's profiler; the trace is written under --profile-dir, one file per rank."""
    _check_auth(request)
    await request.app.state.client.stats("profile_stop")
    return {"profiling": False}


class TokenizeRequest(msgspec.Struct):
    prompt: str | None = None
    messages: list[dict] | None = None


class DetokenizeRequest(msgspec.Struct):
    tokens: list[int]


@post("/tokenize", status_code=200)
async def tokenize(request: Request, data: TokenizeRequest) -> dict:
    _check_auth(request)
    tok = request.app.state.tokenizer
    text = data.prompt if data.messages is None else tok.apply_chat_template(data.messages)
    if text is None:
        raise ApiError(400, "give prompt or messages", param="prompt")
    ids = tok.encode(text)
    return {"tokens": ids, "count": len(ids), "max_model_len": request.app.state.settings.max_seq_len}


@post("/detokenize", status_code=200)
async def detokenize(request: Request, data: DetokenizeRequest) -> dict:
    _check_auth(request)
    tok = request.app.state.tokenizer
    if any(not 0 <= t < tok.vocab_size for t in data.tokens):
        raise ApiError(400, f"token ids must be in [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(data.tokens)}


@get("/health")
async def health(request: Request) -> Response:
    _check_auth(request)
    why = request.app.state.client.unavailable()
    if why is None:
        return Response(b"", status_code=200)
    return _error(503, why, "server_error")


def _on_api_error(request: Request, exc: ApiError) -> Response:
    return _error(exc.status, exc.message, exc.kind, exc.param)


def _on_http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        detail = f"{exc.detail}: {exc.extra}"
    return _error(exc.status_code, str(detail), "invalid_request_error" if exc.status_code < 500 else "server_error")


def _on_unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, (UnicodeDecodeError, msgspec.DecodeError)):
        return _error(400, f"the request body is not valid JSON text: {exc}")
    log.exception("unexpected error", path=request.url.path)
    return _error(500, "internal error", "server_error")


app = Litestar(
    route_handlers=[completions, chat, models, health, metrics, tokenize, detokenize, start_profile, stop_profile],
    lifespan=[lifespan],
    exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_unexpected},
    request_max_body_size=MAX_BODY_BYTES,
)
