"""The engine processes of `ringllm serve`: `--dp-size` N of them (one is a group of one), each spawned so that
CUDA starts clean, and one loop that waits until every one has said it is ready, one has failed, or a signal
asks to stop. What they report (pids, model, context, capacity) is what the API workers are told.

This module stays torch-free: the serve parent never imports the engine, since Granian forks the API workers
from it and each would otherwise start with libtorch mapped (~200 MB resident)."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait

from ringllm.engine.config import EngineConfig
from ringllm.serve import console


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """What each engine process is started with, besides its EngineConfig."""

    workers: int  # API worker processes: one ring pair each
    shutdown_timeout: float
    profiler_max_seconds: float


@dataclasses.dataclass(frozen=True)
class Ready:
    """The engines' ready messages, together: replica 0's model facts, every pid, the smallest capacity."""

    pids: list[int]
    model_path: str
    max_seq_len: int
    vocab_size: int
    kv_slots: int

    @classmethod
    def of(cls, infos: list[dict]) -> Ready:
        """From each replica's ready message (engine/server.py's run_engine_process), replica 0's first."""
        first, kv_slots = infos[0], min(info["kv_slots"] for info in infos)
        pids = [info["pid"] for info in infos]
        return cls(pids, first["model_path"], first["max_seq_len"], first["vocab_size"], kv_slots)


class EngineGroup:
    """The engine processes of one server, replica r at index r. The server serves while any is alive (a dead
    replica only removes a choice); the group's exit code is the first failure's, 0 when every one drained."""

    def __init__(self, procs: list):
        self.procs = procs
        self._told: set[int] = set()  # replicas whose exit was reported
        self._stopping = False

    def name(self, r: int) -> str:
        return "the engine process" if len(self.procs) == 1 else f"engine replica {r}"

    def terminate(self) -> None:
        """SIGTERM to every engine still running: each drains its requests and exits."""
        self._stopping = True
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()

    def is_alive(self) -> bool:
        return any(proc.is_alive() for proc in self.procs)

    @property
    def exitcode(self) -> int | None:
        codes = [proc.exitcode for proc in self.procs]
        if None in codes:
            return None
        return next((c for c in codes if c not in (0, -signal.SIGTERM)), codes[0])

    def join(self, timeout: float | None = None) -> None:
        """Waits until every engine has exited (or `timeout`), saying so when one exits while others serve."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while alive := [p for p in self.procs if p.is_alive()]:  # one look: wait([]) would never return
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            ended = wait([p.sentinel for p in alive], left)
            for proc in alive:
                if proc.sentinel in ended:
                    # Its pipe closes as it exits, a moment before it can be reaped: wait for that, so that
                    # is_alive() and exitcode say what happened.
                    proc.join()
                    self._report(self.procs.index(proc))

    def stop(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL to those still running after `timeout` seconds."""
        self.terminate()
        self.join(timeout)
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()

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


def start_engines(
    config: EngineConfig, dp_size: int, options: EngineOptions, stop: threading.Event
) -> tuple[EngineGroup, Ready] | int:
    """Starts `dp_size` engines and waits for them: (the group, what they reported), or an exit code if they
    could not start (0 if `stop` was set: a signal)."""
    placements = replica_placements(config, dp_size)
    if isinstance(placements, str):
        print(f"error: {placements}", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    procs, pipes = [], []
    for r, (replica, devices) in enumerate(placements):
        ready, ready_end = ctx.Pipe(duplex=False)  # a pipe leaves nothing in /dev/shm, whatever kills us
        name = "ringllm-engine" if dp_size == 1 else f"ringllm-engine-{r}"
        args = (replica, options.workers, ready_end, options.shutdown_timeout, options.profiler_max_seconds)
        procs.append(ctx.Process(target=_engine_process_main, name=name, args=args))
        _start_with_devices(procs[-1], devices)
        ready_end.close()
        pipes.append(ready)
    return wait_until_ready(EngineGroup(procs), pipes, stop)


def replica_placements(config: EngineConfig, dp_size: int) -> list[tuple[EngineConfig, str | None]] | str:
    """Each replica's config and CUDA_VISIBLE_DEVICES (None: leave it as it is), or why they do not fit. One
    engine takes the config as given. With several, replica r takes the r-th group of tp × pp GPUs (of
    --device-ids, else of those visible) through its own CUDA_VISIBLE_DEVICES, and rendezvous port
    --nccl-port + r."""
    if dp_size == 1:
        return [(config, None)]
    world = config.tp_size * config.pp_size
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = config.device_ids or list(range(dp_size * world))
    if config.device != "cpu" and len(ids) < dp_size * world:
        return f"--dp-size {dp_size} × {world} ranks need {dp_size * world} GPUs; --device-ids lists {len(ids)}"
    out = []
    for r in range(dp_size):
        replica = dataclasses.replace(config, device_ids=None, nccl_port=config.nccl_port + r)
        mine = [visible[i] if visible else str(i) for i in ids[r * world : (r + 1) * world]]
        out.append((replica, None if config.device == "cpu" else ",".join(mine)))
    return out


def _start_with_devices(proc, devices: str | None) -> None:
    """Starts `proc` with CUDA_VISIBLE_DEVICES=`devices` (a spawned child inherits the environment), leaving
    this process's own as it was."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        proc.start()
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def wait_until_ready(group: EngineGroup, pipes: list, stop: threading.Event) -> tuple[EngineGroup, Ready] | int:
    """The one ready loop: every engine's message, or the first failure, or a signal."""
    infos: dict[int, dict] = {}
    while len(infos) < len(pipes):
        if stop.is_set():
            return stopped_during_start_up(group)
        waiting = [r for r in range(len(pipes)) if r not in infos]
        wait([pipes[r] for r in waiting] + [group.procs[r].sentinel for r in waiting], 0.2)
        for r in waiting:
            info = _ready_message(pipes[r], group.procs[r])
            if info is None and not group.procs[r].is_alive():
                return abandon(group, f"{group.name(r)} exited during start-up", 1)
            if info is not None and "error" in info:
                group.procs[r].join(5)  # it exits by itself, having cleaned up
                return abandon(group, info["error"], 2)
            if info is not None:
                infos[r] = info
    if stop.is_set():
        return stopped_during_start_up(group)
    return group, Ready.of([infos[r] for r in range(len(pipes))])


def _ready_message(pipe, proc) -> dict | None:
    """The engine's message, if it has sent it."""
    try:
        return pipe.recv() if pipe.poll() else None
    except EOFError:  # it closed its end: it is exiting
        proc.join(5)
        return None


def abandon(group: EngineGroup, why: str, code: int) -> int:
    """The engines cannot serve (one could not start, or what they loaded cannot be served): `why` is said, they
    are stopped, and whatever segments they left are removed (one stopped before it could drain leaves its
    rings). Returns `code`."""
    from ringllm.ipc.lifecycle import remove_stale_segments

    console.line(f"error: {why}")
    group.stop(30.0)
    remove_stale_segments()
    return code


def stopped_during_start_up(group: EngineGroup) -> int:
    """A SIGTERM or Ctrl-C while the engines load: they are stopped and their segments removed; exit 0."""
    from ringllm.ipc.lifecycle import remove_stale_segments

    console.line("ringllm: stopped during start-up")
    group.stop(30.0)
    remove_stale_segments()
    return 0


def _engine_process_main(*args) -> None:
    """The engine process's entry point. It lives here, in a torch-free module, so that the serve parent
    never imports the engine (and torch): Granian forks the API workers from the parent, and each would
    otherwise start with libtorch mapped (~200 MB RSS). Only the spawned engine process imports it."""
    from ringllm.engine.server import run_engine_process

    run_engine_process(*args)


def serve_other_node(config: EngineConfig) -> int:
    """A host other than node 0 serves no HTTP: it runs its share of the ranks until the engine stops them."""
    from ringllm.engine.loader import ModelNotFoundError, checkpoint_path
    from ringllm.engine.worker import run_node

    try:
        path = checkpoint_path(config.model, config.download_dir)
    except ModelNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_node(config, path)
