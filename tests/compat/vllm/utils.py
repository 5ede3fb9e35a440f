"""The harness of the vLLM port: ringllm's counterpart of vLLM's `tests/utils.py::RemoteOpenAIServer`.

vLLM's tests start `vllm serve MODEL ARGS... --port P --seed 0` in a subprocess, wait for /health and hand out
openai clients (`get_client`, `get_async_client`, `url_for`). `RemoteOpenAIServer` here does the same with
`ringllm serve --model <the real GGUF> --served-model-name MODEL_NAME ARGS... --seed 0 --device cpu`, through
tests/helpers.py (`start_server`: its own process group, killed at the end whatever happens, and at the test
process's death). A server that does not start (an option ringllm does not have) fails the fixture with the
server's own log, which names the option.

Starting the real model costs ~20-60 s on the 2-core CPU box, so most modules share the session's
`default_server` (tests/compat/conftest.py, `DEFAULT_ARGS`); a module that needs other options starts its own."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import pytest

from tests.helpers import start_server, stop_server

# ringllm adaptation: the served name of the suite's real model (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF),
# standing for every model vLLM's tests name (Qwen3-0.6B, zephyr-7b-beta, opt-125m, Qwen2.5-1.5B-Instruct, ...).
MODEL_NAME = "Qwen/Qwen2.5-Coder-0.5B-Instruct"

# vLLM's common server arguments (`--max-model-len 8192 --max-num-seqs 128 --enforce-eager`), in the spellings
# ringllm accepts. `--dtype bfloat16/half` is left out: ringllm serves fp32 on CPU (a model/hardware adaptation,
# marked where a test names a dtype).
DEFAULT_ARGS: tuple[str, ...] = ("--max-model-len", "8192", "--max-num-seqs", "128", "--enforce-eager")

# Skips for what is outside a text model's OpenAI server (the list); each says why.
SKIP_LORA = pytest.mark.skip(reason="LoRA adapters: outside this port (ringllm serves the base model only)")
SKIP_PROCESS_LAYOUT = pytest.mark.skip(
    reason="--disable-frontend-multiprocessing runs vLLM's API server inside its engine's process; ringllm's API "
    "workers are always separate processes, so there is no second layout to run the test under"
)


class RemoteOpenAIServer:
    """`ringllm serve` on the real model (or `model_path`), on a free loopback port; a context manager."""

    DUMMY_API_KEY = "token-abc123"  # as vLLM's: the server needs none unless started with --api-key

    def __init__(
        self,
        serve_args: list[str] | tuple[str, ...],
        *,
        model_path: Path | None,
        log_dir: Path,
        served_model_name: str | None = MODEL_NAME,
        env_dict: dict[str, str] | None = None,
        seed: int | None = 0,
    ) -> None:
        args = list(serve_args)
        if model_path is not None:
            args = ["--model", str(model_path), *args]
        if served_model_name is not None:
            args += ["--served-model-name", served_model_name]
        if seed is not None:
            args += ["--seed", str(seed)]
        env = dict(env_dict or {})
        if model_path is not None:
            # The real model's converted tokenizer lives in the shared cache (tests/real_model.py's root): each
            # server reuses it rather than converting the GGUF's tokenizer again.
            env.setdefault("RINGLLM_CACHE", str(model_path.parent.parent))
        self.args = args
        self.proc, self.url = start_server(log_dir, *args, env=env)
        self.host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)
        self.uds = None
        self.show_hidden_metrics = False  # ringllm has no --show-hidden-metrics-for-version

    def __enter__(self) -> RemoteOpenAIServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        stop_server(self.proc)

    @property
    def url_root(self) -> str:
        return self.url

    def url_for(self, *parts: str) -> str:
        return self.url_root + "/" + "/".join(parts)

    def get_client(self, **kwargs) -> openai.OpenAI:
        kwargs.setdefault("timeout", 600)
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY, max_retries=0, **kwargs)

    def get_async_client(self, **kwargs) -> openai.AsyncOpenAI:
        kwargs.setdefault("timeout", 600)
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY, max_retries=0, **kwargs)


def log_dir_for(root: Path, args: list[str] | tuple[str, ...]) -> Path:
    """A fresh folder for one server's log (tests/helpers.py writes serve.log there)."""
    path = root / f"server-{len(os.listdir(root)) if root.exists() else 0}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "args.txt").write_text(" ".join(args))
    return path


def real_server(real_model: Path, server_logs: Path, args, **kwargs) -> RemoteOpenAIServer:
    """vLLM's `RemoteOpenAIServer(MODEL_NAME, args)`, on the real model; its log under `server_logs`."""
    return RemoteOpenAIServer(args, model_path=real_model, log_dir=log_dir_for(server_logs, args), **kwargs)


def demo_server(server_logs: Path, args, **kwargs) -> RemoteOpenAIServer:
    """`ringllm serve` on its built-in demo model (a tiny random Qwen3-shaped model that starts in seconds), for
    tests where vLLM too uses a tiny or unrelated model because the model does not matter."""
    cache = server_logs / "demo-cache"  # the demo model is built once, here, and reused by every demo server
    env = {"RINGLLM_CACHE": str(cache), **kwargs.pop("env_dict", {})}
    return RemoteOpenAIServer(
        args, model_path=None, log_dir=log_dir_for(server_logs, args), served_model_name=None, env_dict=env, **kwargs
    )
