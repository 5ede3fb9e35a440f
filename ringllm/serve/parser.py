"""The `ringllm` command line: `serve`, `generate` and `health`, their options generated from the fields of
ServeConfig, ServeLimits and EngineConfig (options.py), plus vLLM's spellings (vllm_flags.py). Kept apart from
cli.py so that `ringllm health` can parse a running server's command line without importing the launcher."""

from __future__ import annotations

import argparse
import importlib.metadata

from ringllm.engine.config import EngineConfig
from ringllm.serve.options import ServeConfig, ServeLimits, add_options
from ringllm.serve.vllm_flags import add_model_argument, add_vllm_flags

ENV_NOTE = (
    "Every option can also be set by an environment variable: RINGLLM_ and the option's first name in "
    "capitals with underscores (RINGLLM_CONTEXT_LEN=2048, RINGLLM_ENFORCE_EAGER=1, "
    "RINGLLM_SERVED_MODEL_NAME=a,b); the command line wins. A RINGLLM_ variable that no option has is "
    "named in a warning at start."
)


def version() -> str:
    try:
        return f"ringllm {importlib.metadata.version('ringllm')}"
    except importlib.metadata.PackageNotFoundError:
        return "ringllm (not installed: run scripts/setup.sh)"


def build_parser() -> argparse.ArgumentParser:
    """The parser, with the declared defaults: main() then reads the RINGLLM_ variables into it
    (options.read_environment)."""
    parser = argparse.ArgumentParser(prog="ringllm", description="A small, fast OpenAI-compatible LLM server.")
    parser.add_argument("--version", action="version", version=version())
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="start the engine and the OpenAI-compatible HTTP server", epilog=ENV_NOTE)
    srv.add_argument("--version", action="version", version=version())
    add_model_argument(srv)
    add_options(srv, ServeConfig)
    add_options(srv, ServeLimits)
    add_options(srv.add_argument_group("engine"), EngineConfig)
    add_vllm_flags(srv)
    gen = sub.add_parser("generate", help="generate text offline and stream it to the terminal", epilog=ENV_NOTE)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible output)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_options(gen.add_argument_group("engine"), EngineConfig)
    health = sub.add_parser("health", help="exit 0 when the running `ringllm serve` answers /health with 200")
    health.add_argument(
        "--pid",
        type=int,
        default=None,
        help="the server's process id (default: PID 1 if it is ringllm serve, else the oldest one)",
    )
    health.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    return parser


def subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of one sub-command (`serve`, `generate`, `health`)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]
