"""Fixtures shared by the compatibility suites (tests/compat/vllm, tests/compat/sglang) and the known-defect tests.

- Servers: `default_server` is `ringllm serve` on the real model with utils.DEFAULT_ARGS, started once for the
  whole session and shared by every module whose vLLM server arguments come down to those (vLLM starts one per
  module; here that would cost a minute of CPU each). Modules that need other arguments start their own with
  `RemoteOpenAIServer` (module-scoped, stopped at the module's end).
- Async tests: vLLM's run under pytest-asyncio (`@pytest.mark.asyncio`), which this project does not install;
  anyio's pytest plugin (installed with httpx) runs the same coroutines, so an `asyncio` mark gets `anyio` too.
- The real model's tokenizer (vLLM's `get_tokenizer(MODEL_NAME)`) through transformers' own GGUF loader.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tests.compat.vllm.utils import DEFAULT_ARGS, real_server


def pytest_configure(config):
    config.addinivalue_line("markers", "asyncio: a coroutine test (run by anyio's plugin here, see conftest.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector, name, obj):
    """A coroutine test marked `asyncio` (vLLM's pytest-asyncio mark) runs under anyio: it asks for the
    `anyio_backend` fixture before it is parametrized, as anyio's own `anyio` mark does."""
    if inspect.iscoroutinefunction(obj) and collector.istestfunction(obj, name):
        marks = [*_marks(obj), *_marks(collector.obj)]
        if any(m.name == "asyncio" for m in marks):
            pytest.mark.usefixtures("anyio_backend")(obj)


def _marks(obj) -> list:
    marks = getattr(obj, "pytestmark", [])
    return marks if isinstance(marks, list) else [marks]


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def server_logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-compat-servers")


@pytest.fixture(scope="session")
def default_server(real_model, server_logs):
    with real_server(real_model, server_logs, DEFAULT_ARGS) as server:
        yield server


@pytest.fixture(scope="session")
def tokenizer(real_model):
    """The real model's tokenizer as transformers loads it from the GGUF file (vLLM: get_tokenizer(MODEL_NAME))."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(real_model.parent), gguf_file=real_model.name)


@pytest.fixture(scope="session")
def vocab_size(real_model) -> int:
    """vLLM's `ModelConfig(...).get_vocab_size()`: the model's vocabulary (its embedding rows), from its config."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(real_model.parent), gguf_file=real_model.name).vocab_size
