"""The `ringllm` command. `generate` runs the engine in this process; imports of the engine stay inside the
commands that need it, so the app package itself never loads torch."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import importlib.metadata
import math
import os
import signal
import sys
import threading
from pathlib import Path

from ringllm.app.limits import ServeLimits, granian_options
from ringllm.app.options import ServeConfig, add_options, from_args, read_environment
from ringllm.engine.config import EngineConfig

DEMO_NOTE = (
    "note: no --model given, so this is ringllm's demo model: random weights, so its output is random "
    "text. Point --model at a Hugging Face checkpoint directory (or hub id) for real output."
)


ENV_NOTE = (
    "Every option can also be set by an environment variable: RINGLLM_ and the option's first name in "
    "capitals with underscores (RINGLLM_CONTEXT_LEN=2048, RINGLLM_ENFORCE_EAGER=1, "
    "RINGLLM_SERVED_MODEL_NAME=a,b); the command line wins."
)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    add_options(p.add_argument_group("engine"), EngineConfig)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return from_args(EngineConfig, args)


def _version() -> str:
    try:
        return f"ringllm {importlib.metadata.version('ringllm')}"
    except importlib.metadata.PackageNotFoundError:
        return "ringllm (not installed: run scripts/setup.sh)"


def build_parser() -> argparse.ArgumentParser:
    """Options come from ServeConfig's and EngineConfig's fields. Every option can also be set by an
    environment variable named after its first spelling: RINGLLM_CONTEXT_LEN for --context-len (alias
    --max-model-len), RINGLLM_SERVED_MODEL_NAME=a,b for several names (main reads them)."""
    parser = argparse.ArgumentParser(prog="ringllm", description="A small, fast OpenAI-compatible LLM server.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="start the engine and the OpenAI-compatible HTTP server", epilog=ENV_NOTE)
    srv.add_argument("--version", action="version", version=_version())
    add_options(srv, ServeConfig)
    add_options(srv, ServeLimits)
    add_engine_args(srv)
    gen = sub.add_parser("generate", help="generate text offline and stream it to the terminal", epilog=ENV_NOTE)
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible output)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_engine_args(gen)
    health = sub.add_parser("health", help="exit 0 when the running `ringllm serve` answers /health with 200")
    health.add_argument(
        "--pid",
        type=int,
        default=None,
        help="the server's process id (default: PID 1 if it is ringllm serve, else the oldest one)",
    )
    health.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for the answer")
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    from ringllm.engine.llm import LLM
    from ringllm.engine.logs import configure_logging
    from ringllm.engine.sampling_params import SamplingParams
    from ringllm.text.chat_template import chat_prompt_ids

    configure_logging(args.log_level)
    if args.model is None:
        print(DEMO_NOTE, file=sys.stderr)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sampling_seed,
            stop=args.stop,
        )
        llm = LLM(config=engine_config(args))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    async def stream(prompt: str | list[int]) -> str | None:
        reason = None
        async for piece in llm.generate(prompt, params):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            reason = piece.finish_reason
        return reason

    try:
        # --chat: rendered and tokenized as the server's chat route does it (a model without a template: exit 2)
        chat = [{"role": "user", "content": args.prompt}]
        reason = asyncio.run(stream(chat_prompt_ids(llm.tokenizer, chat) if args.chat else args.prompt))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        llm.close()
    print(f"\n[finish_reason: {reason}]", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Starts the engine in its own (spawned, so CUDA starts clean) process, waits for it, then hosts the
    app with Granian; the engine process is stopped when Granian returns."""
    signals = _ShutdownSignals()  # first: a SIGTERM or Ctrl-C from here on stops whatever has started, cleanly
    from ringllm.engine.logs import configure_logging

    configure_logging(args.log_level)
    if args.model is None:
        print(DEMO_NOTE, file=sys.stderr)
    try:
        config = engine_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config.node_rank > 0:
        signals.release()  # a signal ends this host's process; its ranks die with it (ipc/process.py)
        return serve_other_node(config)
    if (problem := _tokenizer_problem(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if (problem := _port_problem(args.host, args.port)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.profiler_dir:
        config = dataclasses.replace(config, profile_dir=args.profiler_dir)
    if args.dp_size > 1:
        started = _start_replicas(config, args, signals)
    else:
        started = _start_engine(config, args, signals)
    if isinstance(started, int):
        return started
    proc, info = started
    os.environ.update(_worker_environment(args, info))
    scheme = "https" if args.ssl_certfile else "http"
    banner = (
        f"ringllm ready on {scheme}://{args.host}:{args.port} | model {served_names(args)[0]} | "
        f"tp {args.tp_size} pp {args.pp_size} | KV capacity {info['kv_slots']} tokens"
    )
    if args.dp_size > 1:
        banner += f" per replica | dp {args.dp_size}"
    threading.Thread(
        target=_announce_when_answering, args=(args, banner, proc), name="ready-banner", daemon=True
    ).start()
    return _host_app(args, proc, signals)


class _ShutdownSignals:
    """SIGTERM and SIGINT (Ctrl-C) of the serve process, from its first line on. While the engine starts they
    stop it (the engine is told with SIGTERM and its segments are removed; exit 0); once Granian runs, both
    drain (`on_drain`, set by _host_app). Without this a signal in the first seconds killed the parent alone and
    left the engine running as an orphan."""

    def __init__(self):
        self.received = threading.Event()
        self.on_drain = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.on_drain is not None:
            self.on_drain()
        self.received.set()

    def release(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)

    def stop_starting_engine(self, proc) -> int:
        print("ringllm: stopped during start-up", file=sys.stderr, flush=True)
        from ringllm.ipc.lifecycle import remove_stale_segments

        _stop_engine(proc, 30.0)
        remove_stale_segments()
        return 0


def _stop_engine(proc, timeout: float) -> None:
    proc.terminate()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()


def _port_problem(host: str, port: int) -> str | None:
    """Granian binds with SO_REUSEPORT, so a second server on a busy port would start and split the traffic
    with the first. A bind without SO_REUSEPORT fails while anyone listens there; checked before the engine
    loads anything."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot listen on {host}:{port}: {e}"
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        try:
            s.bind(address)
            s.listen(1)
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror} (is another server running there?)"
    return None


def _announce_when_answering(args: argparse.Namespace, banner: str, proc) -> None:
    """Prints the ready line once the port answers HTTP (any status: an API worker is up), not before
    Granian has bound it. Gives up when the engine stops first."""
    import time

    from ringllm.app.health_check import probe

    while proc.is_alive():
        try:
            probe(args, timeout=1.0)
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)
            continue
        print(banner, file=sys.stderr, flush=True)
        return


def _tokenizer_problem(args: argparse.Namespace) -> str | None:
    """Loads the tokenizer (and chat template) the API workers will load, before the engine loads any weights,
    so a missing or broken one fails at once with the file named. A GGUF file's tokenizer is built here once
    (cached) for the workers. The demo model and hub ids are checked by the engine as it finds them."""
    from pathlib import Path

    from ringllm.text.chat_template import read_chat_template
    from ringllm.text.tokenizer import Tokenizer, TokenizerError

    source = args.tokenizer or args.model
    try:
        template = read_chat_template(args.chat_template) if args.chat_template else None
        if source is None or not (Path(source).expanduser().exists() or source.startswith((".", "/", "~"))):
            return None
        Tokenizer(source, chat_template=template, sanitize_control_tokens=args.sanitize_control_tokens)
    except (TokenizerError, ValueError, OSError) as e:
        return str(e)
    return None


def _start_engine(config, args: argparse.Namespace, signals: _ShutdownSignals):
    """(engine process, its ready message), or an exit code if it could not start (0 if a signal stopped it)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, ready_end = ctx.Pipe(duplex=False)  # a pipe leaves nothing in /dev/shm, whatever kills us
    proc = ctx.Process(
        target=_engine_process_main,
        name="ringllm-engine",
        args=(config, args.workers, ready_end, args.shutdown_timeout, args.profiler_max_seconds),
    )
    proc.start()
    ready_end.close()
    while True:
        if signals.received.is_set():
            return signals.stop_starting_engine(proc)
        try:
            if ready.poll(0.2):
                info = ready.recv()
                break
        except EOFError:  # the engine closed its end: it is exiting
            proc.join(5)
        if not proc.is_alive():
            print("error: the engine process exited during start-up", file=sys.stderr)
            return 1
    if "error" in info:
        proc.join(5)
        print(f"error: {info['error']}", file=sys.stderr)
        return 2
    if signals.received.is_set():
        return signals.stop_starting_engine(proc)
    return proc, info


def _engine_process_main(*args) -> None:
    """The engine process's entry point. It lives here, in a torch-free module, so that the serve parent
    never imports the engine (and torch): Granian forks the API workers from the parent, and each would
    otherwise start with libtorch mapped (~200 MB RSS). Only the spawned engine process imports it."""
    from ringllm.engine.server import run_engine_process

    run_engine_process(*args)


def _start_replicas(config, args: argparse.Namespace, signals: _ShutdownSignals):
    """--dp-size N: N engine processes, each with its own KV pool, prefix cache and rings, loading at once.
    Replica r takes the r-th group of tp × pp GPUs (of --device-ids, else of those visible), through its own
    CUDA_VISIBLE_DEVICES, and rendezvous port --nccl-port + r. Returns (a ReplicaGroup, replica 0's ready
    message with every replica's pid and the smallest KV capacity), or an exit code as _start_engine does."""
    import multiprocessing as mp

    ctx, world = mp.get_context("spawn"), config.tp_size * config.pp_size
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = config.device_ids or list(range(args.dp_size * world))
    if config.device != "cpu" and len(ids) < args.dp_size * world:
        print(
            f"error: --dp-size {args.dp_size} × {world} ranks need {args.dp_size * world} GPUs; "
            f"--device-ids lists {len(ids)}",
            file=sys.stderr,
        )
        return 2
    procs, pipes = [], []
    for r in range(args.dp_size):
        replica = dataclasses.replace(config, device_ids=None, nccl_port=config.nccl_port + r)
        mine = [visible[i] if visible else str(i) for i in ids[r * world : (r + 1) * world]]
        ready, ready_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_engine_process_main,
            name=f"ringllm-engine-{r}",
            args=(replica, args.workers, ready_end, args.shutdown_timeout, args.profiler_max_seconds),
        )
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        if config.device != "cpu":
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)  # a spawned child inherits the environment
        try:
            proc.start()
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        ready_end.close()
        procs.append(proc)
        pipes.append(ready)
    group = ReplicaGroup(procs)
    infos: list = [None] * len(procs)
    while any(info is None for info in infos):
        if signals.received.is_set():
            return signals.stop_starting_engine(group)
        for r, (proc, ready) in enumerate(zip(procs, pipes)):
            try:
                if infos[r] is None and ready.poll(0.1):
                    infos[r] = ready.recv()
            except EOFError:  # the replica closed its end: it is exiting
                proc.join(5)
            if infos[r] is None and not proc.is_alive():
                print(f"error: engine replica {r} exited during start-up", file=sys.stderr)
                _stop_engine(group, 30.0)
                return 1
    failed = [info["error"] for info in infos if "error" in info]
    if failed:
        _stop_engine(group, 30.0)
        print(f"error: {failed[0]}", file=sys.stderr)
        return 2
    if signals.received.is_set():
        return signals.stop_starting_engine(group)
    info = dict(infos[0], replica_pids=[i["pid"] for i in infos], kv_slots=min(i["kv_slots"] for i in infos))
    return group, info


class ReplicaGroup:
    """The --dp-size engine processes behind the interface of one multiprocessing.Process, as _host_app and
    _stop_engine use it: alive while any replica is (the server serves while one does), joined when all have
    exited, and its exit code the first failure's (0 when every replica drained)."""

    def __init__(self, procs: list):
        self.procs = procs
        self.pid = procs[0].pid
        self._told: set[int] = set()  # replicas whose exit was reported
        self._stopping = False

    def terminate(self) -> None:
        self._stopping = True
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: every replica drains

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()

    def is_alive(self) -> bool:
        return any(proc.is_alive() for proc in self.procs)

    @property
    def exitcode(self) -> int | None:
        codes = [proc.exitcode for proc in self.procs]
        if None in codes:
            return None
        return next((c for c in codes if c not in (0, -signal.SIGTERM)), codes[0])

    def join(self, timeout: float | None = None) -> None:
        """Waits until every replica has exited (or `timeout`), saying so when one exits while others
        serve."""
        import time
        from multiprocessing.connection import wait

        deadline = None if timeout is None else time.monotonic() + timeout
        while alive := [p for p in self.procs if p.is_alive()]:  # one look: wait([]) would never return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            ready = wait([p.sentinel for p in alive], left)
            for proc in alive:
                if proc.sentinel in ready:
                    # Its pipe closes as it exits, a moment before it can be reaped: wait for that, so that
                    # is_alive() and exitcode say what happened.
                    proc.join()
                    self._report(self.procs.index(proc))

    def _report(self, r: int) -> None:
        serving = sum(p.is_alive() for p in self.procs)
        if r not in self._told and not self._stopping and serving:
            self._told.add(r)
            proc = self.procs[r]
            print(
                f"error: engine replica {r} (pid {proc.pid}) exited (code {proc.exitcode}); {serving} of "
                f"{len(self.procs)} replicas serve on",
                file=sys.stderr,
                flush=True,
            )


def served_names(args: argparse.Namespace) -> list[str]:
    """The names clients use for the model: --served-model-name, else the --model argument as given (as vLLM
    does: a hub id stays whole, a directory keeps its path)."""
    return args.served_model_name or [args.model or "ringllm-demo"]


def _worker_environment(args: argparse.Namespace, info: dict) -> dict[str, str]:
    """The settings each API worker decodes (app/settings.py), in their one variable."""
    from ringllm.app.settings import WorkerSettings
    from ringllm.text.chat_template import read_chat_template

    settings = WorkerSettings(
        engine_pids=info.get("replica_pids") or [info["pid"]],  # --dp-size N: every replica's
        workers=args.workers,
        kv_slots=info["kv_slots"],
        max_seq_len=info["max_seq_len"],
        vocab_size=info["vocab_size"],
        model_path=info["model_path"],
        served_models=served_names(args),
        tokenizer_path=args.tokenizer or info["model_path"],
        chat_template=read_chat_template(args.chat_template) if args.chat_template else None,
        sanitize_control_tokens=args.sanitize_control_tokens,
        tool_call_parser=args.tool_call_parser or None,
        reasoning_parser=args.reasoning_parser or None,
        api_key=args.api_key or None,
        public_routes=[r for r in args.public_routes.split(",") if r],
        allowed_origins=args.allowed_origins or [],
        request_timeout=args.request_timeout if (args.request_timeout or 0) > 0 else None,
        body_read_timeout=args.body_read_timeout,
        max_waiting_requests=args.max_waiting_requests,
        engine_stall_timeout=args.engine_stall_timeout,
        profiler_routes=bool(args.profiler_dir),
        log_level=args.log_level,
    )
    return settings.to_environment()


def _host_app(args: argparse.Namespace, proc, signals: _ShutdownSignals) -> int:
    """Runs Granian until the engine stops, then removes whatever rings the engine left. Exit 1 if the engine
    died, 0 for a shutdown.

    SIGTERM drains: it goes to the engine, which tells the API workers (they answer new requests and /health
    with 503), finishes the requests in flight (up to --shutdown-timeout) and exits; only then are the API
    workers stopped, so that the last tokens still reach their clients. SIGINT (Ctrl-C) does the same. A second
    signal stops the API workers at once."""
    from granian import Granian
    from granian.constants import Interfaces

    from ringllm.ipc.lifecycle import remove_stale_segments

    server = Granian(
        "ringllm.app.server:create_app",
        factory=True,  # each worker builds its app from the settings in _worker_environment's variable
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        workers_kill_timeout=max(1, math.ceil(args.shutdown_timeout)),
        respawn_failed_workers=True,  # a dead API worker is replaced; it reclaims its ring pair
        **granian_options(args, args.workers),
        **granian_operator_options(args),
    )
    draining = threading.Event()

    def on_sigterm(*_):
        if draining.is_set():
            server.signal_handler_interrupt()
        draining.set()
        server.respawn_failed_workers = False  # API workers that stop now (a signal to the group) stay stopped
        proc.terminate()  # SIGTERM: the engine drains

    def watch_engine():
        proc.join()
        if not draining.is_set() and proc.exitcode != 0:
            print(
                f"error: the engine process exited (code {proc.exitcode}); shutting down", file=sys.stderr, flush=True
            )
        server.signal_handler_interrupt()

    def take_signals():
        # Granian installs its own handlers as it starts; a start-up hook runs after that and before the workers.
        signal.signal(signal.SIGTERM, signals._handle)
        signal.signal(signal.SIGINT, signals._handle)

    signals.on_drain = on_sigterm
    if signals.received.is_set():  # a signal between the engine's start and here
        on_sigterm()
    server.on_startup(take_signals)
    threading.Thread(target=watch_engine, name="engine-watch", daemon=True).start()
    try:
        server.serve()
    except SystemExit:
        # Granian exits 1 when a worker stops without being told; a SIGTERM to the whole process group does that.
        if not draining.is_set():
            raise
    finally:
        # An engine that drained exits 0; one stopped by a SIGTERM to the whole process group is a shutdown too.
        engine_died = not proc.is_alive() and proc.exitcode not in (0, -signal.SIGTERM)
        _stop_engine(proc, args.shutdown_timeout + 10)
        remove_stale_segments()  # a killed engine could not unlink its rings
    return 1 if engine_died else 0


def granian_operator_options(args: argparse.Namespace) -> dict:
    """Granian's logging through our structlog JSON chain (its access log off: app/access_log.py writes one
    line per request with its request id) and TLS from --ssl-keyfile/--ssl-certfile."""
    from ringllm.engine.logs import stdlib_logging_config

    options: dict = dict(log_dictconfig=stdlib_logging_config(args.log_level), log_access=False)
    if args.ssl_certfile:
        options.update(ssl_cert=Path(args.ssl_certfile), ssl_key=Path(args.ssl_keyfile))
    return options


def serve_other_node(config) -> int:
    """A host other than node 0 serves no HTTP: it runs its share of the ranks until the engine stops them."""
    from ringllm.engine.loader import ModelNotFoundError, checkpoint_path
    from ringllm.engine.worker import run_node

    try:
        path = checkpoint_path(config.model, config.download_dir)
    except ModelNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_node(config, path)


def serve_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with serve options that the parser cannot see, found before anything starts."""
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        return "--ssl-keyfile and --ssl-certfile go together"
    for flag, path in (("--ssl-keyfile", args.ssl_keyfile), ("--ssl-certfile", args.ssl_certfile)):
        if path and not Path(path).is_file():
            return f"{flag} {path}: no such file"
    if args.dp_size < 1:
        return f"--dp-size must be >= 1, got {args.dp_size}"
    if args.dp_size > 1 and args.nnodes > 1:
        return "--dp-size above 1 runs on one host: it cannot be combined with --nnodes"
    if args.tokenizer and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        return f"--tokenizer {args.tokenizer}: not a directory with a tokenizer.json"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    read_environment(parser)
    args = parser.parse_args(argv)
    if args.command == "generate":
        return cmd_generate(args)
    if args.command == "serve":
        why = serve_args_problem(args)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
        return cmd_serve(args)
    if args.command == "health":
        from ringllm.app.health_check import cmd_health

        return cmd_health(args)
    return 2
