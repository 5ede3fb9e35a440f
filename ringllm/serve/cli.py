"""The `ringllm` command: parses (parser.py), then runs `serve`, `generate` (generate.py) or `health`
(health_check.py). `serve` here is the order of things: checks that need nothing started, the engines
(launch.py), the API workers' settings, then Granian (host.py). Nothing here imports torch: the engine is
imported only by the processes and commands that run it."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import msgspec

from ringllm.app.settings import SamplingDefaults, WorkerSettings
from ringllm.engine.config import EngineConfig
from ringllm.engine.logs import get_logger
from ringllm.ipc.sampling import MAX_LOGPROBS
from ringllm.serve import console
from ringllm.serve.generate import cmd_generate
from ringllm.serve.generation_config import GenerationConfigError, folder_problem, sampling_defaults
from ringllm.serve.health_check import cmd_health
from ringllm.serve.host import ShutdownSignals, hand_over, host, port_problem
from ringllm.serve.launch import EngineOptions, Ready, abandon, serve_other_node, start_engines
from ringllm.serve.options import from_args, option_variables, read_environment, unknown_variables
from ringllm.serve.parser import build_parser, subparser
from ringllm.serve.vllm_flags import take_model_argument

log = get_logger("serve")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    read_environment(parser)
    args = parser.parse_args(argv)
    if args.command == "health":
        return cmd_health(args)
    console.configure(args.log_level)
    console.warn_unknown_variables(unknown_variables(parser))
    if args.command == "generate":
        return cmd_generate(args)
    take_model_argument(subparser(parser, "serve"), args)
    if why := serve_args_problem(args):
        return _error(why)
    return cmd_serve(args, option_variables(parser))


def cmd_serve(args: argparse.Namespace, option_names: set[str]) -> int:
    """Starts the engines (spawned processes, so CUDA starts clean), waits for them, then hosts the API workers
    with Granian; the engines are stopped when Granian returns. `option_names`: the RINGLLM_ option variables,
    which the API workers do not inherit (host.hand_over)."""
    signals = ShutdownSignals()  # first: a SIGTERM or Ctrl-C from here on stops whatever has started, cleanly
    if args.model is None:
        console.demo_note()
    try:
        config = from_args(EngineConfig, args)
    except ValueError as e:
        return _error(str(e))
    if config.node_rank > 0:
        signals.release()  # a signal ends this host's process; its ranks die with it (ipc/process.py)
        return serve_other_node(config)
    try:
        template = checked_before_start(args)
    except ValueError as e:
        return _error(str(e))
    if args.profiler_dir:
        config = dataclasses.replace(config, profile_dir=args.profiler_dir)
    options = EngineOptions(args.workers, args.shutdown_timeout, args.profiler_max_seconds)
    started = start_engines(config, args.dp_size, options, signals.received)
    if isinstance(started, int):
        return started
    engines, ready = started
    try:
        defaults = logged_sampling_defaults(args.generation_config, ready.model_path)
    except GenerationConfigError as e:
        return abandon(engines, str(e), 2)
    hand_over(worker_settings(args, ready, template, defaults), option_names)
    return host(args, engines, signals, lambda: announce_ready(args, ready))


def _error(why: str) -> int:
    print(f"error: {why}", file=sys.stderr)
    return 2


def serve_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with serve options that the parser cannot see, found before anything starts."""
    if args.skip_tokenizer_init and (why := tokenizer_options_problem(args)):
        return why
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        return "--ssl-keyfile and --ssl-certfile go together"
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path and not Path(path).is_file():
            return f"{flag} {path}: no such file"
    for flag, value in (("--dp-size", args.dp_size), ("--workers", args.workers)):
        if value < 1:
            return f"{flag} must be >= 1, got {value}"
    if args.dp_size > 1 and args.nnodes > 1:
        return "--dp-size above 1 runs on one host: it cannot be combined with --nnodes"
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        return f"--tokenizer {args.tokenizer}: not a directory with a tokenizer.json"
    positive = ("--body-read-timeout", "--engine-stall-timeout", "--max-waiting-requests")
    for flag in positive:
        if (value := getattr(args, flag[2:].replace("-", "_"))) <= 0:
            return f"{flag} must be > 0, got {value}"
    if not 0 <= args.max_logprobs <= MAX_LOGPROBS:
        return f"--max-logprobs {args.max_logprobs}: ringllm's sampler returns 0 to {MAX_LOGPROBS} logprobs per token"
    if args.request_timeout is not None and args.request_timeout < 0:
        return f"--request-timeout must be >= 0 (0: no limit), got {args.request_timeout}"
    return None


# What only a server with the tokenizer can use: with --skip-tokenizer-init, each is an error naming it.
TOKENIZER_OPTIONS = (
    "tokenizer",
    "chat_template",
    "sanitize_control_tokens",
    "tool_call_parser",
    "reasoning_parser",
    "enable_tokenizer_info_endpoint",
)


def tokenizer_options_problem(args: argparse.Namespace) -> str | None:
    given = [name for name in TOKENIZER_OPTIONS if getattr(args, name)]
    if not given:
        return None
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    return f"--skip-tokenizer-init serves without the model's tokenizer, which {flags} need: give one or the other"


def checked_before_start(args: argparse.Namespace) -> str | None:
    """--chat-template's text, read here once for every API worker, after the checks that need nothing started:
    the tokenizer (with that template) loads as the workers will load it (unless --skip-tokenizer-init: they load
    none), --generation-config names a file, and the port is free. So a missing or broken file fails at once, naming it, before the engine loads any
    weights. A GGUF file's tokenizer is built here once (cached) for the workers; the demo model and hub ids
    are checked by the engine as it finds them. ValueError says what is wrong."""
    from ringllm.text.chat_template import read_chat_template
    from ringllm.text.tokenizer import Tokenizer, TokenizerError

    source = None if args.skip_tokenizer_init else args.tokenizer or args.model
    try:
        template = read_chat_template(args.chat_template) if args.chat_template else None
        if source is not None and (Path(source).expanduser().exists() or source.startswith((".", "/", "~"))):
            Tokenizer(source, chat_template=template, sanitize_control_tokens=args.sanitize_control_tokens)
    except (TokenizerError, OSError) as e:
        raise ValueError(str(e)) from None
    listening = None if args.uds else port_problem(args.host, args.port)  # a socket file is Granian's to replace
    if problem := folder_problem(args.generation_config) or listening:
        raise ValueError(problem)
    return template


def logged_sampling_defaults(choice: str, model_path: str) -> SamplingDefaults:
    """--generation-config's defaults for the engines' model, written to the start-up log with their source."""
    defaults, source = sampling_defaults(choice, model_path)
    log.info(source, **{k: v for k, v in msgspec.structs.asdict(defaults).items() if v is not None})
    return defaults


def served_names(args: argparse.Namespace) -> list[str]:
    """The names clients use for the model: --served-model-name, else the --model argument as given (as vLLM
    does: a hub id stays whole, a directory keeps its path)."""
    return args.served_model_name or [args.model or "ringllm-demo"]


def worker_settings(
    args: argparse.Namespace, ready: Ready, chat_template: str | None, defaults: SamplingDefaults
) -> WorkerSettings:
    """Everything an API worker is told: the engines' facts and the options that concern it."""
    return WorkerSettings(
        engine_pids=ready.pids,
        workers=args.workers,
        kv_slots=ready.kv_slots,
        max_seq_len=ready.max_seq_len,
        vocab_size=ready.vocab_size,
        model_path=ready.model_path,
        served_models=served_names(args),
        tokenizer_path=args.tokenizer or ready.model_path,
        chat_template=chat_template,
        skip_tokenizer_init=args.skip_tokenizer_init,
        sanitize_control_tokens=args.sanitize_control_tokens,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        api_key=args.api_key or None,
        public_routes=[route for route in args.public_routes.split(",") if route],
        allowed_origins=args.allowed_origins or [],
        allowed_hosts=[args.host, *(args.allowed_hosts or [])],
        request_timeout=args.request_timeout or None,
        body_read_timeout=args.body_read_timeout,
        send_timeout=args.send_timeout,
        request_slots=args.backpressure,
        max_waiting_requests=args.max_waiting_requests,
        engine_stall_timeout=args.engine_stall_timeout,
        profiler_routes=bool(args.profiler_dir),
        log_level=args.log_level,
        sampling_defaults=defaults,
        root_path=args.root_path or None,
        server_load_tracking=args.enable_server_load_tracking,
        tokenizer_info_route=args.enable_tokenizer_info_endpoint,
        max_logprobs=args.max_logprobs,
        force_include_usage=args.enable_force_include_usage,
        return_tokens_as_token_ids=args.return_tokens_as_token_ids,
        request_id_headers=args.enable_request_id_headers,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        priority_scheduling=args.scheduling_policy == "priority",
    )


def announce_ready(args: argparse.Namespace, ready: Ready) -> None:
    scheme = "https" if args.ssl_certfile else "http"
    url = f"unix:{args.uds}" if args.uds else f"{scheme}://{args.host}:{args.port}"
    model = served_names(args)[0]
    console.ready_line(url, model, args.tp_size, args.pp_size, ready.kv_slots, args.dp_size)
