"""Hosting the API workers with Granian: the listener and its limits, the hand-over of the workers' settings,
the ready line, signals, and the drain that stops everything in order.

Connection limits, measured with Granian 2.8 (the silent, partial and keep-alive connection tests in
tests/e2e/test_connections.py): under HTTP/1 a connection that sends nothing, part of a request line or part of its
headers is closed after the header-read timeout, and so is an idle keep-alive connection; under `--http auto`
(HTTP/1 and h2c) a connection that sends nothing is held forever while Granian waits to see which protocol it
speaks. A connection that sends its headers and then part of its body reaches the app, whose body-read limit
answers 408 (ringllm/app/limits.py)."""

from __future__ import annotations

import argparse
import math
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ringllm.app.settings import WorkerSettings
from ringllm.serve.console import granian_logging
from ringllm.serve.launch import EngineGroup

APP_FACTORY = "ringllm.app.server:create_app"  # each API worker builds its app from the settings, once


class ShutdownSignals:
    """SIGTERM and SIGINT (Ctrl-C) of the serve process, from its first line on. While the engines start they
    stop them (launch.py: the engines are told with SIGTERM and their segments are removed; exit 0); once
    Granian runs, both drain (`on_drain`, set by host()). Without this a signal in the first seconds killed the
    parent alone and left the engine running as an orphan."""

    def __init__(self):
        self.received = threading.Event()
        self.on_drain: Callable[[], None] | None = None
        self.take()

    def take(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.on_drain is not None:
            self.on_drain()
        self.received.set()

    def release(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)


def port_problem(host: str, port: int) -> str | None:
    """Granian binds with SO_REUSEPORT, so a second server on a busy port would start and split the traffic
    with the first. A bind without SO_REUSEPORT fails while anyone listens there; checked before the engine
    loads anything."""
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


def granian_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for Granian(...) from `ringllm serve`'s options: protocols and connection limits,
    logging through our structlog chain (its access log off: app/access_log.py writes one line per request
    with its request id), TLS from --ssl-keyfile/--ssl-certfile.

    Granian's backpressure counts connections, not requests: it is --max-connections (split over the workers),
    far above the request slots (--backpressure, counted by the API workers: app/limits.py), so that clients
    holding every slot, or idle connections, never keep /health from being accepted. Under --http auto an
    HTTP/2 connection is pinged every header-read timeout and closed when a ping goes unanswered for as long: a
    client that sent only the HTTP/2 preface is closed so."""
    from granian.constants import HTTPModes
    from granian.http import HTTP1Settings, HTTP2Settings

    header_ms = min(60_000, max(1, round(args.header_read_timeout * 1000)))  # Granian's range
    options = dict(
        http=HTTPModes.http1 if args.http == "1" else HTTPModes.auto,
        backlog=max(128, args.backlog),
        backpressure=max(1, args.max_connections // max(1, args.workers)),
        http1_settings=HTTP1Settings(header_read_timeout=header_ms, keep_alive=True),
        # keep_alive_interval in milliseconds, keep_alive_timeout in whole seconds (Granian's units)
        http2_settings=HTTP2Settings(
            keep_alive_interval=header_ms, keep_alive_timeout=max(1, math.ceil(header_ms / 1000))
        ),
        log_dictconfig=granian_logging(args.log_level),
        log_access=False,
    )
    if args.ssl_certfile:
        options.update(ssl_cert=Path(args.ssl_certfile), ssl_key=Path(args.ssl_keyfile))
    if getattr(args, "uds", None):  # vLLM's --uds: a Unix socket in place of --host/--port
        options.update(uds=Path(args.uds))
    return options


def enough_descriptors(connections: int) -> None:
    """Each open connection is a file descriptor of an API worker: the soft limit goes up to the hard one where
    --max-connections needs it (a common soft limit is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 1024  # the engine's segments, the model's files, the tokenizer
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))


def _granian(args: argparse.Namespace):
    from granian import Granian
    from granian.constants import Interfaces

    return Granian(
        APP_FACTORY,
        factory=True,
        address=args.host,
        port=args.port,
        interface=Interfaces.ASGI,
        workers=args.workers,
        workers_kill_timeout=max(1, math.ceil(args.shutdown_timeout)),
        respawn_failed_workers=True,  # a dead API worker is replaced; it reclaims its ring pair
        **granian_options(args),
    )


def hand_over(settings: WorkerSettings, option_variables: set[str]) -> None:
    """What the API workers inherit: the settings, in their one variable, and none of the RINGLLM_ option
    variables, so that a worker can learn an option no other way."""
    for name in option_variables:
        os.environ.pop(name, None)
    os.environ.update(settings.to_environment())


def host(
    args: argparse.Namespace,
    engines: EngineGroup,
    signals: ShutdownSignals,
    announce: Callable[[], None],
) -> int:
    """Runs Granian until the engines stop, then removes whatever rings they left. Exit 1 if an engine died,
    0 for a shutdown. `announce` (the ready line) runs once Granian listens, before any API worker starts, so
    nobody gets an answer from /health before it is written.

    SIGTERM drains: it goes to the engines, which tell the API workers (they answer new requests and /health
    with 503), finish the requests in flight (up to --shutdown-timeout) and exit; only then are the API workers
    stopped, so that the last tokens still reach their clients. SIGINT (Ctrl-C) does the same. A second
    signal stops the API workers at once."""
    from ringllm.ipc.lifecycle import remove_stale_segments

    enough_descriptors(args.max_connections)
    server = _granian(args)
    draining = threading.Event()

    def on_sigterm():
        if draining.is_set():
            server.signal_handler_interrupt()
        draining.set()
        server.respawn_failed_workers = False  # API workers that stop now (a signal to the group) stay stopped
        engines.terminate()  # SIGTERM: the engines drain

    def watch_engines():
        engines.join()
        if not draining.is_set() and engines.exitcode != 0:
            print(
                f"error: the engine process exited (code {engines.exitcode}); shutting down",
                file=sys.stderr,
                flush=True,
            )
        server.signal_handler_interrupt()

    signals.on_drain = on_sigterm
    if signals.received.is_set():  # a signal between the engines' start and here
        on_sigterm()
    # Granian installs its own signal handlers as it starts, then binds and listens, then runs its start-up
    # hooks, then starts the workers: ours go back in, and the ready line is written before any worker answers.
    server.on_startup(signals.take)
    server.on_startup(announce)
    threading.Thread(target=watch_engines, name="engine-watch", daemon=True).start()
    try:
        server.serve()
    except SystemExit:
        # Granian exits 1 when a worker stops without being told; a SIGTERM to the whole process group does that.
        if not draining.is_set():
            raise
    finally:
        # An engine that drained exits 0; one stopped by a SIGTERM to the whole process group is a shutdown too.
        engine_died = not engines.is_alive() and engines.exitcode not in (0, -signal.SIGTERM)
        engines.stop(args.shutdown_timeout + 10)
        remove_stale_segments()  # a killed engine could not unlink its rings
    return 1 if engine_died else 0
