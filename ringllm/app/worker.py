"""One API worker's serving objects, built once as its lifespan starts (the engine's rings need the worker's
event loop) from its WorkerSettings, and closed as it ends. Every Granian worker runs the lifespan: the engine
starts once, outside the workers, and each worker claims its own ring pair per engine."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ringllm.app import chat as chat_io
from ringllm.app.chat_completion import ChatService
from ringllm.app.completion import CompletionService
from ringllm.app.engine_client import EngineDown
from ringllm.app.metrics import Metrics
from ringllm.app.replicas import Replicas
from ringllm.app.requests import Generations
from ringllm.app.served_model import ServedModel
from ringllm.app.settings import WorkerSettings
from ringllm.app.status import ServerStatus
from ringllm.app.tokenization import TokenizeService
from ringllm.engine.logs import configure_logging, get_logger
from ringllm.ipc.lifecycle import open_metrics_table
from ringllm.ipc.process import die_with_parent
from ringllm.text.tokenizer import Tokenizer

log = get_logger("app")


@dataclass
class Services:
    """What the routes call."""

    model: ServedModel
    completions: CompletionService
    chat: ChatService
    tokenize: TokenizeService
    status: ServerStatus


class Worker:
    def __init__(self, settings: WorkerSettings, services: Services | None = None):
        """`services`: serving objects built already (tests over a fake engine); the lifespan builds them
        otherwise."""
        self.settings = settings
        self._services = services
        self._given = services is not None

    @property
    def services(self) -> Services:
        if self._services is None:
            raise RuntimeError("the API worker has not started (its lifespan builds the services)")
        return self._services

    @asynccontextmanager
    async def lifespan(self, _app) -> AsyncIterator[None]:
        if self._given:
            yield
            return
        s = self.settings
        die_with_parent(name="ringllm-api")  # no API worker outlives the serve process (ipc/process.py)
        configure_logging(s.log_level)
        # --skip-tokenizer-init: none (token ids in and out; app/served_model.py refuses what needs text)
        tokenizer = (
            None if s.skip_tokenizer_init else Tokenizer(s.tokenizer_path, s.chat_template, s.sanitize_control_tokens)
        )
        template = tokenizer.template_text if tokenizer is not None else None
        parsers = chat_io.model_parsers(s.model_path, template, s.tool_call_parser, s.reasoning_parser)
        # One EngineClient (ring pair) and heartbeat per engine: one engine, or --dp-size replicas.
        try:
            replicas = Replicas(s.engine_pids, s.workers, s.kv_slots, s.engine_stall_timeout)
        except EngineDown as e:
            # The engine went away while this worker started (a SIGTERM during start-up, or an engine that
            # died): one line, and out; a traceback from the lifespan would read as a crash of the server.
            log.error("the API worker cannot start", reason=str(e), pid=os.getpid())
            os._exit(1)
        first = replicas.first  # replica 0, unless this worker started after it died
        assert first is not None  # Replicas raised EngineDown otherwise
        table = open_metrics_table(s.engine_pids[first])
        index = replicas.clients[first].index  # type: ignore[union-attr]  # the first open replica's
        metrics = Metrics(table, index, s.served_model, s.engine_pids[first])
        model = ServedModel(tokenizer, s)
        generations = Generations(replicas, tokenizer, metrics, s.request_timeout, s.max_waiting_requests)
        self._services = Services(
            model,
            CompletionService(model, generations),
            ChatService(model, generations, parsers),
            TokenizeService(model),
            ServerStatus(replicas, metrics, s.engine_stall_timeout),
        )
        log.info("app worker ready", worker=index, pid=os.getpid())
        try:
            yield
        finally:
            replicas.close()  # every replica's client and heartbeat, replica 0's included
            table.close()
