"""The Litestar app each Granian worker runs, built by `create_app` (Granian's target, a factory) from the
WorkerSettings that `ringllm serve` hands its workers (app/settings.py): no other setting reaches a worker."""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import asynccontextmanager

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.response import Stream

from ringllm.app import chat as chat_io
from ringllm.app.access_log import RequestLog, request_id
from ringllm.app.cors import cors_config
from ringllm.app.engine_client import EngineDown
from ringllm.app.errors import ApiError, error_response
from ringllm.app.guard import guard
from ringllm.app.limits import MAX_BODY_BYTES, bound_body_reads
from ringllm.app.metrics import Metrics
from ringllm.app.replicas import ReplicaCollector, Replicas, merge_stats
from ringllm.app.requests import collect, fan_out, make_jobs, tokenize_text
from ringllm.app.schemas import (
    MAX_PROMPTS,
    ChatChoice,
    ChatChunk,
    ChatLogprobs,
    ChatMessageOut,
    ChatRequest,
    ChatResponse,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    Message,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ringllm.app.settings import WorkerSettings
from ringllm.app.tokenizer import AppTokenizer
from ringllm.engine.logs import configure_logging, get_logger
from ringllm.ipc import messages as m
from ringllm.ipc.lifecycle import open_metrics_table
from ringllm.ipc.process import die_with_parent
from ringllm.ipc.sampling import StructuredOutputs

log = get_logger("app")
_json = msgspec.json.Encoder()


@asynccontextmanager
async def lifespan(app: Litestar):
    die_with_parent(name="ringllm-api")  # no API worker outlives the serve process (ipc/process.py)
    s: WorkerSettings = app.state.settings
    configure_logging(s.log_level)
    app.state.tokenizer = AppTokenizer(s.tokenizer_path, s.chat_template, s.sanitize_control_tokens)
    app.state.max_token_chars = app.state.tokenizer.max_token_chars  # bounds a text before tokenizing
    app.state.chat_parsers = chat_io.model_parsers(
        s.model_path, app.state.tokenizer.template_text, s.tool_call_parser, s.reasoning_parser
    )
    app.state.stall_timeout = s.engine_stall_timeout
    # One EngineClient (ring pair) and heartbeat per engine: one engine, or --dp-size replicas.
    try:
        app.state.replicas = Replicas(s.engine_pids, s.workers, s.kv_slots, app.state.stall_timeout)
    except EngineDown as e:
        # The engine went away while this worker started (a SIGTERM during start-up, or an engine that
        # died): one line, and out; a traceback from the lifespan would read as a crash of the server.
        log.error("the API worker cannot start", reason=str(e), pid=os.getpid())
        os._exit(1)
    first = app.state.replicas.first  # replica 0, unless this worker started after it died
    app.state.client = app.state.replicas.clients[first]
    app.state.heartbeat = app.state.replicas.heartbeats[first]
    table = open_metrics_table(s.engine_pids[first])
    app.state.metrics = Metrics(table, app.state.client.index, s.served_model, s.engine_pids[first])
    if len(s.engine_pids) > 1:
        app.state.replica_metrics = ReplicaCollector(s.served_model)
        app.state.metrics.registry.register(app.state.replica_metrics)
    log.info("app worker ready", worker=app.state.client.index, pid=os.getpid())
    try:
        yield
    finally:
        app.state.replicas.close()  # every replica's client and heartbeat, replica 0's included
        table.close()


# ---- helpers ----
def _check_model(request: Request, model: str | None) -> None:
    served = request.app.state.settings.served_models
    if model is not None and model not in served:
        names = ", ".join(map(repr, served))
        raise ApiError(404, f"model {model!r} does not exist; this server serves {names}", "not_found_error", "model")


def _sampling(
    req,
    max_tokens: int | None,
    default_max_tokens: int | None,
    prompt_len: int,
    max_seq_len: int,
    logprobs: int | None = None,
    vocab: int | None = None,
) -> tuple[m.Sampling, list[str]]:
    """The engine's parameters of a request (their bounds were checked as it was decoded) and its stop strings.
    An explicit max_tokens must fit the context after the prompt; without one, the default (or everything the
    context has left) is used. The token ids it names (logit_bias, stop_token_ids) must be below `vocab`."""
    room = max_seq_len - prompt_len
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_len} tokens; the context holds {max_seq_len}", param="messages")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} plus the prompt's {prompt_len} tokens exceed the context of {max_seq_len} tokens",
            param="max_tokens",
        )
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    try:
        params = req.sampling_params(max_tokens=max_tokens, logprobs=logprobs)
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split()[0]) from None
    if vocab and (why := params.token_id_outside(vocab)) is not None:
        raise ApiError(400, why, param=why.split(":")[0])
    return params, params.stop


def _token_text(tok, tid: int) -> str:
    return tok.decode([tid], skip_special_tokens=False)


def _completion_logprobs(tok, lps) -> CompletionLogprobs:
    return CompletionLogprobs(
        [_token_text(tok, t) for t, _, _ in lps],
        [lp for _, lp, _ in lps],
        [None if top is None else {_token_text(tok, i): v for i, v in top} for _, _, top in lps],
    )


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
    except Exception:  # a bug must still end the stream visibly, not cut it without a word
        log.exception("stream failed")
        yield _sse(ErrorResponse(ErrorBody("internal error", "server_error", None, None)))


# ---- routes ----
@post("/v1/completions", status_code=200)
async def completions(request: Request, data: CompletionRequest) -> Response | Stream:
    _check_model(request, data.model)
    s, tok = request.app.state.settings, request.app.state.tokenizer
    prompts = _prompt_list(data.prompt)
    vocab = s.vocab_size or tok.vocab_size
    # Text prompts get the tokenizer's special tokens (Llama's BOS) as in transformers and vLLM; ids are as given.
    ids_list = [
        await tokenize_text(request, p, add_special_tokens=True) if isinstance(p, str) else list(p) for p in prompts
    ]
    for ids in ids_list:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
    longest = max(len(ids) for ids in ids_list)
    sampling, stops = _sampling(data, data.max_tokens, 16, longest, s.max_seq_len, data.logprobs, vocab)
    want_lp = data.logprobs is not None
    echoes = None
    if data.echo:  # the prompt comes back before the completion, with its tokens' logprobs if asked for
        sampling = msgspec.structs.replace(sampling, prompt_logprobs=data.logprobs)
        echoes = [p if isinstance(p, str) else tok.decode(ids) for p, ids in zip(prompts, ids_list)]
    jobs = make_jobs(request, ids_list, sampling, data.n, echoes)
    prompt_tokens = sum(len(ids) for ids in ids_list)
    rid, created, model = f"cmpl-{request_id(request)}", int(time.time()), s.served_model
    if data.stream:

        async def events():
            counts = [0] * len(jobs)
            async for index, text, reason, count, lps in fan_out(request, jobs, stops):
                counts[index] = count
                lp = _completion_logprobs(tok, lps) if want_lp else None
                yield _sse(CompletionResponse(rid, created, model, [CompletionChoice(index, text, reason, lp)]))
            if data.stream_options and data.stream_options.include_usage:
                yield _sse(CompletionResponse(rid, created, model, [], _usage(prompt_tokens, sum(counts))))
            yield b"data: [DONE]\n\n"

        return Stream(_sse_stream(events()), media_type="text/event-stream")
    texts, reasons, counts, all_lps = await collect(request, jobs, stops, len(jobs))
    choices = [
        CompletionChoice(i, texts[i], reasons[i], _completion_logprobs(tok, all_lps[i]) if want_lp else None)
        for i in range(len(jobs))
    ]
    body = CompletionResponse(rid, created, model, choices, _usage(prompt_tokens, sum(counts)))
    return Response(_json.encode(body), media_type="application/json")


def _prompt_list(prompt) -> list:
    """The request's prompts: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    kinds = {type(x) for x in prompt}
    if len(kinds) > 1:
        raise ApiError(
            400,
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            param="prompt",
        )
    if not prompt or kinds == {int}:
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    return list(prompt)


@post("/v1/chat/completions", status_code=200)
async def chat(request: Request, data: ChatRequest) -> Response | Stream:
    _check_model(request, data.model)
    s, tok = request.app.state.settings, request.app.state.tokenizer
    tool_parser, reasoning_parser = request.app.state.chat_parsers
    plan = chat_io.tool_plan(data, tool_parser)
    messages = chat_io.template_messages(data.messages, tok.template_text)
    extra = chat_io.template_kwargs(data)
    try:
        text = tok.apply_chat_template(messages, plan.template_tools, **extra)
    except Exception as e:  # a template that rejects the conversation
        raise ApiError(400, f"chat template failed: {e}", param="messages") from None
    ids = await tokenize_text(request, text, param="messages", encode=tok.encode_chat)
    max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
    want_lp = data.logprobs
    sampling, stops = _sampling(
        data,
        max_tokens,
        None,
        len(ids),
        s.max_seq_len,
        (data.top_logprobs or 0) if want_lp else None,
        s.vocab_size or tok.vocab_size,
    )
    if plan.schema is not None:
        sampling = _constrained(sampling, plan.schema)
    jobs = make_jobs(request, [ids], sampling, data.n)
    parsers = [chat_io.AnswerParser(text, reasoning_parser, plan) for _ in jobs]
    rid, created, model = f"chatcmpl-{request_id(request)}", int(time.time()), s.served_model
    if data.stream:

        async def events():
            first = [ChatStreamChoice(i, ChatMessageOut(role="assistant", content=""), None) for i in range(len(jobs))]
            yield _sse(ChatChunk(rid, created, model, first))
            counts = [0] * len(jobs)
            async for index, piece, reason, count, lps in fan_out(request, jobs, stops):
                counts[index] = count
                for chunk in _chat_chunks(
                    rid,
                    created,
                    model,
                    index,
                    parsers[index],
                    piece,
                    reason,
                    _chat_logprobs(tok, lps) if want_lp else None,
                ):
                    yield _sse(chunk)
            if data.stream_options and data.stream_options.include_usage:
                yield _sse(ChatChunk(rid, created, model, [], _usage(len(ids), sum(counts))))
            yield b"data: [DONE]\n\n"

        return Stream(_sse_stream(events()), media_type="text/event-stream")
    texts, reasons, counts, all_lps = await collect(request, jobs, stops, len(jobs))
    choices = [
        ChatChoice(
            i,
            chat_io.whole_message(parsers[i], texts[i]),
            chat_io.finish_reason(parsers[i], reasons[i]),
            _chat_logprobs(tok, all_lps[i]) if want_lp else None,
        )
        for i in range(len(jobs))
    ]
    body = ChatResponse(rid, created, model, choices, _usage(len(ids), sum(counts)))
    return Response(_json.encode(body), media_type="application/json")


def _chat_chunks(rid, created, model, index, parser, piece, reason, logprobs) -> list[ChatChunk]:
    """The stream chunks of one piece of a choice: a chunk per part the parser made certain (reasoning,
    content, tool-call fragments); the piece's logprobs ride on the first, its finish_reason on the last.
    A piece that made nothing certain (a tag still open) sends nothing unless it ends the choice."""
    deltas = [d for d in (parser.feed(piece), parser.finish() if reason else None) if d]
    if not deltas and reason is None and logprobs is None:
        return []
    messages = [msg for d in deltas for msg in chat_io.delta_messages(d)] or [ChatMessageOut(content="")]
    reason = chat_io.finish_reason(parser, reason)
    return [
        ChatChunk(
            rid,
            created,
            model,
            [ChatStreamChoice(index, msg, reason if k == len(messages) - 1 else None, logprobs if k == 0 else None)],
        )
        for k, msg in enumerate(messages)
    ]


def _constrained(sampling: m.Sampling, schema: dict) -> m.Sampling:
    """tool_choice "required" or a named function: the output must match `schema` (the structured-output
    machinery of ipc/sampling.py), so the call is valid JSON for the function's parameters."""
    if sampling.structured_outputs is not None:
        raise ApiError(
            400,
            "tool_choice 'required' or a named function cannot be combined with another output "
            "constraint (response_format, structured_outputs)",
            param="tool_choice",
        )
    # Compact JSON: a call needs no layout, and unbounded whitespace would let a model spend its tokens on it.
    constraint = StructuredOutputs(json=schema, disable_any_whitespace=True)
    return msgspec.structs.replace(sampling, structured_outputs=constraint)


@get("/v1/models")
async def models(request: Request) -> dict:
    s = request.app.state.settings
    return {
        "object": "list",
        "data": [
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "ringllm",
                "root": s.model_path,
                "max_model_len": s.max_seq_len,
                "vocab_size": s.vocab_size,
            }
            for name in s.served_models
        ],
    }


@get("/metrics")
async def metrics(request: Request) -> Response:
    """The engine's values from a stats round trip (exact: it follows every message sent before); when the
    engine's loop has not turned for a second, or does not answer within METRICS_WAIT_SECONDS, the values it
    last published in its heartbeat, at once."""
    if len(request.app.state.replicas.clients) > 1:
        return await _replicas_metrics(request)
    beat = request.app.state.heartbeat
    engine = beat.last_stats()
    if beat.silent_for() < 1.0:
        try:
            engine = await request.app.state.client.stats(timeout=METRICS_WAIT_SECONDS)
        except (EngineDown, asyncio.TimeoutError):
            pass
    return Response(request.app.state.metrics.render(engine), media_type="text/plain; version=0.0.4")


METRICS_WAIT_SECONDS = 2.0


async def _replicas_metrics(request: Request) -> Response:
    """--dp-size N: the replicas' engine stats summed (each asked at once, or read from its heartbeat as
    above), plus how many replicas serve and a few values per replica (app/replicas.py)."""
    replicas, collector = request.app.state.replicas, request.app.state.replica_metrics
    per_replica = await replicas.stats(METRICS_WAIT_SECONDS)
    collector.per_replica = per_replica
    collector.serving = sum(replicas.unavailable(r) is None for r in range(len(replicas.clients)))
    body = request.app.state.metrics.render(merge_stats(per_replica))
    return Response(body, media_type="text/plain; version=0.0.4")


@post("/start_profile", status_code=200)
async def start_profile(request: Request) -> dict:
    """Starts the engine's profiler; it stops itself after --profiler-max-seconds. These two routes exist only
    with --profiler-dir (PROFILER_ROUTES)."""
    await _profiler_command(request, "profile_start")
    return {"profiling": True}


@post("/stop_profile", status_code=200)
async def stop_profile(request: Request) -> dict:
    """Stops the engine's profiler; the trace is written under --profiler-dir, one file per rank."""
    await _profiler_command(request, "profile_stop")
    return {"profiling": False}


async def _profiler_command(request: Request, command: str) -> None:
    try:
        await request.app.state.client.stats(command)
    except EngineDown as e:
        raise ApiError(503, str(e), "server_error") from None
    except asyncio.TimeoutError:
        raise ApiError(
            503, "the engine did not answer within 10 s (it may be writing a profiler trace)", "server_error"
        ) from None


class TokenizeRequest(msgspec.Struct):
    prompt: str | None = None
    messages: list[Message] | None = None  # as in a chat request; rendered with the chat template
    add_special_tokens: bool | None = None  # default: True for a prompt (as completions), False for messages


class DetokenizeRequest(msgspec.Struct):
    tokens: list[int]


@post("/tokenize", status_code=200)
async def tokenize(request: Request, data: TokenizeRequest) -> dict:
    tok = request.app.state.tokenizer
    if (data.prompt is None) == (data.messages is None):
        raise ApiError(400, "give either prompt or messages", param="prompt")
    text, special = data.prompt, data.add_special_tokens
    if data.messages is not None:
        messages = chat_io.template_messages(data.messages, tok.template_text)
        try:
            text = tok.apply_chat_template(messages)
        except Exception as e:  # no template, or one that rejects the conversation
            raise ApiError(400, f"chat template failed: {e}", param="messages") from None
    special = data.messages is None if special is None else special
    encode = tok.encode_chat if data.messages is not None and not special else None
    assert text is not None  # the prompt, or the rendered messages
    ids = await tokenize_text(request, text, add_special_tokens=special, bound=False, encode=encode)
    return {"tokens": ids, "count": len(ids), "max_model_len": request.app.state.settings.max_seq_len}


@post("/detokenize", status_code=200)
async def detokenize(request: Request, data: DetokenizeRequest) -> dict:
    tok = request.app.state.tokenizer
    if any(not 0 <= t < tok.vocab_size for t in data.tokens):
        raise ApiError(400, f"token ids must be in [0, {tok.vocab_size})", param="tokens")
    return {"prompt": tok.decode(data.tokens)}


@get("/health")
async def health(request: Request) -> Response:
    if len(request.app.state.replicas.clients) > 1:
        why, body = request.app.state.replicas.health()  # 200 while one replica serves; the body says which
        if why is None:
            return Response(_json.encode(body), status_code=200, media_type="application/json")
        return error_response(503, why, "server_error")
    why = request.app.state.client.unavailable() or _engine_stalled(request)
    if why is None:
        return Response(b"", status_code=200)
    return error_response(503, why, "server_error")


def _engine_stalled(request: Request) -> str | None:
    """Why the engine counts as hung: its loop, which turns every step and every idle poll, has not turned for
    --engine-stall-timeout seconds (ipc/heartbeat.py)."""
    silent, limit = request.app.state.heartbeat.silent_for(), request.app.state.stall_timeout
    if silent < limit:
        return None
    busy = "with requests to run" if request.app.state.heartbeat.has_work() else "while idle"
    return f"the engine has made no progress for {silent:.0f} s {busy}"


def _on_api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.kind, exc.param)


def _on_http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        detail = f"{exc.detail}: {exc.extra}"
    return error_response(
        exc.status_code, str(detail), "invalid_request_error" if exc.status_code < 500 else "server_error"
    )


def _on_unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, (UnicodeDecodeError, msgspec.DecodeError)):
        return error_response(400, f"the request body is not valid JSON text: {exc}")
    if isinstance(exc, RecursionError) and "deserializing" in str(exc):  # msgspec's bound on nesting
        return error_response(400, "the request body nests arrays or objects too deeply")
    log.exception("unexpected error", path=request.url.path)
    return error_response(500, "internal error", "server_error")


def create_app(settings: WorkerSettings | None = None) -> RequestLog:
    """One API worker's ASGI app: request ids and the access log around the Litestar app. Granian calls this
    with no argument (its target is this factory), and the launcher's settings are decoded then, once."""
    s = WorkerSettings.from_environment() if settings is None else settings
    app = Litestar(
        route_handlers=[
            completions,
            chat,
            models,
            health,
            metrics,
            tokenize,
            detokenize,
            *([start_profile, stop_profile] if s.profiler_routes else []),  # --profiler-dir: off unless asked for
        ],
        lifespan=[lifespan],
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_unexpected},
        # The API key and the Content-Type, then the body within a time limit.
        middleware=[guard, DefineMiddleware(bound_body_reads, timeout=s.body_read_timeout)],
        request_max_body_size=MAX_BODY_BYTES,
        cors_config=cors_config(s.allowed_origins),
        state=State({"settings": s}),
    )
    return RequestLog(app)
