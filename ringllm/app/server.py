"""The Litestar app each Granian worker runs, built by `create_app` from the worker's WorkerSettings (Granian
calls it with factory=True in each worker; the settings come from the one variable `ringllm serve` sets). The
routes only translate HTTP: the work is the serving objects' (app/worker.py builds them)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get, post, route
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware.base import DefineMiddleware
from litestar.params import JSONBody
from litestar.response import Stream

from ringllm.app import chat as chat_io
from ringllm.app import orca
from ringllm.app.access_log import RequestLog, request_id
from ringllm.app.asgi_layers import ServedUnder, ServerLoad
from ringllm.app.cors import cors_config
from ringllm.app.errors import ApiError, error_response, invalid_body
from ringllm.app.guard import guard
from ringllm.app.limits import MAX_BODY_BYTES, ClientBounds, bound_body_reads
from ringllm.app.schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ringllm.app.settings import WorkerSettings
from ringllm.app.sse import sse_stream
from ringllm.app.vllm_routes import vllm_routes
from ringllm.app.worker import Services, Worker
from ringllm.engine.logs import get_logger
from ringllm.ipc.sampling import FieldError

log = get_logger("app")
_json = msgspec.json.Encoder()


def create_app(settings: WorkerSettings | None = None, services: Services | None = None) -> RequestLog:
    """The ASGI app of one API worker: the settings are `ringllm serve`'s (decoded once, here, when none are
    given), since CORS, the body-read limit and the profiler routes shape the app itself. The worker's lifespan
    builds the serving objects, unless `services` are given (tests over a fake engine)."""
    settings = settings or WorkerSettings.from_environment()
    worker = Worker(settings, services)
    load = ServerLoad() if settings.server_load_tracking else None
    extra = vllm_routes(lambda: worker.services.model, settings, load)
    app = Litestar(
        route_handlers=_routes(worker, settings.profiler_routes) + extra,
        lifespan=[worker.lifespan],
        exception_handlers={ApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_unexpected},
        # The Host, the API key and the Content-Type, then the body within a time limit.
        middleware=[
            DefineMiddleware(
                guard,
                api_key=settings.api_key,
                public_routes=set(settings.public_routes),
                allowed_hosts=settings.allowed_hosts,
            ),
            DefineMiddleware(bound_body_reads, timeout=settings.body_read_timeout),
        ],
        request_max_body_size=MAX_BODY_BYTES,
        cors_config=cors_config(settings.allowed_origins),
        state=State({"settings": settings}),  # what this worker was started with, for whoever inspects it
    )
    # Layers, inside out: the load count (--enable-server-load-tracking); the send timeout and the request slots
    # (app/limits.py); the --root-path prefix, taken off before the layers that look at the path; request ids and
    # the access log around everything.
    inner: Any = app if load is None else load.wrap(app)
    inner = ClientBounds(inner, settings.send_timeout, settings.request_slots)
    if settings.root_path:
        inner = ServedUnder(inner, settings.root_path)
    return RequestLog(inner, settings.request_id_headers)


def _routes(worker: Worker, profiler: bool) -> list:
    """The routes, closed over the worker whose serving objects answer them. The profiler's two exist only
    with --profiler-dir."""

    def answer(request: Request, result: msgspec.Struct | AsyncIterator[bytes]) -> Response | Stream:
        """A whole answer as JSON (with an ORCA load report when the request asks for one: app/orca.py), or a
        stream's SSE frames."""
        if not isinstance(result, msgspec.Struct):
            return Stream(sse_stream(result), media_type="text/event-stream")
        metrics_format = request.headers.get(orca.REQUEST_HEADER)
        headers = orca.load_report(metrics_format, worker.services.status.load()) if metrics_format else {}
        return Response(_json.encode(result), media_type="application/json", headers=headers)

    @post("/v1/completions", status_code=200)  # Litestar's @post answers 201 by default: OpenAI's routes, 200
    async def completions(request: Request, data: JSONBody[CompletionRequest]) -> Response | Stream:
        services = worker.services
        return answer(request, await services.completions.create(data, request_id(request), _disconnect_of(request)))

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request, data: JSONBody[ChatRequest]) -> Response | Stream:
        services = worker.services
        extras = chat_io.message_extras(await request.body())
        return answer(request, await services.chat.create(data, request_id(request), _disconnect_of(request), extras))

    @post("/invocations", status_code=200)
    async def invocations(request: Request) -> Response | Stream:
        """SageMaker's route, as vLLM serves it: a body with `messages` is a chat request, one with `prompt` a
        completion, answered as that route answers it."""
        body = await request.body()
        kind = _invocation_kind(body)
        rid, disconnected = request_id(request), _disconnect_of(request)
        if kind is ChatRequest:
            chat = _decode(body, ChatRequest)
            return answer(
                request, await worker.services.chat.create(chat, rid, disconnected, chat_io.message_extras(body))
            )
        completion = _decode(body, CompletionRequest)
        return answer(request, await worker.services.completions.create(completion, rid, disconnected))

    @get("/v1/models")
    async def models() -> dict:
        return worker.services.model.listing()

    @post("/tokenize", status_code=200)
    async def tokenize(request: Request, data: JSONBody[TokenizeRequest]) -> dict:
        extras = chat_io.message_extras(await request.body()) if data.messages is not None else None
        return await worker.services.tokenize.tokenize(data, extras)

    @post("/detokenize", status_code=200)
    async def detokenize(data: JSONBody[DetokenizeRequest]) -> dict:
        return worker.services.tokenize.detokenize(data)

    @route(["/health", "/ping"], http_method=["GET", "HEAD"])  # /ping: SageMaker's (vLLM's) health check
    async def health() -> Response:
        why, body = worker.services.status.health()
        if why is not None:
            return error_response(503, why, "server_error")
        return Response(b"" if body is None else _json.encode(body), status_code=200, media_type="application/json")

    @post("/ping", status_code=200)
    async def ping() -> Response:
        return await health.fn()

    @get("/metrics")
    async def metrics() -> Response:
        body = await worker.services.status.render_metrics()
        return Response(body, media_type="text/plain; version=0.0.4")

    @post("/start_profile", status_code=200)
    async def start_profile() -> dict:
        """Starts the engine's profiler; it stops itself after --profiler-max-seconds."""
        await worker.services.status.profiler("profile_start")
        return {"profiling": True}

    @post("/stop_profile", status_code=200)
    async def stop_profile() -> dict:
        """Stops the engine's profiler; the trace is written under --profiler-dir, one file per rank."""
        await worker.services.status.profiler("profile_stop")
        return {"profiling": False}

    routes = [completions, chat, invocations, models, tokenize, detokenize, health, ping, metrics]
    return routes + ([start_profile, stop_profile] if profiler else [])


class _Invocation(msgspec.Struct):
    """What tells an /invocations body's route (the values are only checked to be JSON, not built)."""

    messages: msgspec.Raw = msgspec.Raw()  # empty when absent
    prompt: msgspec.Raw = msgspec.Raw()


def _invocation_kind(body: bytes) -> type:
    try:
        shape = msgspec.json.decode(body, type=_Invocation)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not a JSON object: {e}") from None
    if shape.messages:
        return ChatRequest
    if shape.prompt:
        return CompletionRequest
    raise ApiError(400, "/invocations takes a chat request (with messages) or a completion request (with prompt)")


def _decode(body: bytes, kind: type):
    """The body as the chat or completions route decodes it: an invalid one is their 400, naming its field."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        raise ApiError(400, f"Validation failed for POST /invocations: {e}", param=_field_of(e)) from None


def _disconnect_of(request: Request):
    async def disconnected() -> None:
        """Returns when the client closes the connection (the body was read already; only that event is left).
        Under Granian (HTTP/1.1) a streaming client's disconnect arrives as CancelledError in the stream instead,
        which aborts there; a whole answer needs this watcher."""
        message = await request.receive()
        while message["type"] != "http.disconnect":
            message = await request.receive()

    return disconnected


def _on_api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.kind, exc.param, exc.code)


def _on_http_error(request: Request, exc: HTTPException) -> Response:
    detail, param = str(exc.detail), _field_of(exc)
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        detail, named = invalid_body(exc.extra)
        param = param or named
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(exc.status_code, detail, kind, param)


def _field_of(exc: BaseException) -> str | None:
    """The field a body's validation error names, when a check run while decoding it (a FieldError from
    ipc/sampling.py's bounds) caused it; msgspec keeps that cause."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, FieldError):
            return cause.field
        cause = cause.__cause__ or cause.__context__
    return None


def _on_unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, (UnicodeDecodeError, msgspec.DecodeError)):  # msgspec's, which Litestar makes a 500
        return error_response(400, f"the request body is not valid JSON text: {exc}")
    if isinstance(exc, RecursionError) and "deserializing" in str(exc):  # msgspec's bound on nesting
        return error_response(400, "the request body nests arrays or objects too deeply")
    log.exception("unexpected error", path=request.url.path)
    return error_response(500, "internal error", "server_error")
