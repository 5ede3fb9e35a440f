"""The serving objects (app/completion.py, app/chat_completion.py, app/tokenization.py) built as an API worker
builds them, over a FakeEngine instead of the engine's rings: the OpenAI layer without a server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from ringllm.app.chat_completion import ChatService
from ringllm.app.completion import CompletionService
from ringllm.app.metrics import Metrics
from ringllm.app.requests import Generations
from ringllm.app.served_model import ServedModel
from ringllm.app.settings import WorkerSettings
from ringllm.app.tokenization import TokenizeService
from ringllm.text.tokenizer import Tokenizer
from tests.app.fake_engine import FakeEngine, MemoryTable
from tests.tokenizer_files import bpe_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return bpe_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@dataclass
class Serving:
    engine: FakeEngine
    metrics: Metrics
    model: ServedModel
    completions: CompletionService
    chat: ChatService
    tokenize: TokenizeService

    def count(self, reason: str) -> float:
        """Finished requests with this finish reason, as /metrics reports them."""
        for line in self.metrics.render({}).decode().splitlines():
            if line.startswith("ringllm_requests_total{") and f'finish_reason="{reason}"' in line:
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no ringllm_requests_total for {reason}")


@pytest.fixture
def build(tokenizer_dir):
    """build(**WorkerSettings fields, parsers=(tool, reasoning)) -> Serving."""

    def make(parsers=("hermes", None), **fields) -> Serving:
        settings = WorkerSettings(
            **{
                "engine_pids": [1],
                "workers": 1,
                "max_seq_len": 1024,
                "model_path": str(tokenizer_dir),
                "served_models": ["m", "other-name"],
                "tokenizer_path": str(tokenizer_dir),
                **fields,
            }
        )
        tokenizer = Tokenizer(settings.tokenizer_path, settings.chat_template, settings.sanitize_control_tokens)
        engine = FakeEngine(tokenizer)  # the script's; with skip_tokenizer_init the worker's objects have none
        served = None if settings.skip_tokenizer_init else tokenizer
        metrics = Metrics(MemoryTable(), 0, settings.served_model)
        model = ServedModel(served, settings)
        generations = Generations(engine, served, metrics, settings.request_timeout, settings.max_waiting_requests)
        return Serving(
            engine,
            metrics,
            model,
            CompletionService(model, generations),
            ChatService(model, generations, parsers),
            TokenizeService(model),
        )

    return make


@pytest.fixture
def serving(build) -> Serving:
    return build()


async def never() -> None:
    """A client that stays connected."""
    await asyncio.Event().wait()


async def collect_frames(frames) -> list:
    """The JSON events of an SSE stream, with "[DONE]" for the end marker."""
    import json

    out = []
    async for frame in frames:
        assert frame.startswith(b"data: ") and frame.endswith(b"\n\n"), frame
        data = frame[6:-2]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


class FakeStatus:
    """app/status.py's ServerStatus for an engine that serves (no rings, no heartbeat)."""

    def __init__(self):
        self.commands: list[str] = []
        self.unavailable: str | None = None
        self.stats = {"running": 2.0, "waiting": 1.0, "kv_slots_total": 100.0, "kv_slots_used_by_requests": 25.0}

    def load(self) -> dict[str, float]:
        return self.stats

    def health(self):
        return self.unavailable, None

    async def render_metrics(self) -> bytes:
        return b"ringllm_num_requests_running 0.0\n"

    async def profiler(self, command: str) -> None:
        self.commands.append(command)
