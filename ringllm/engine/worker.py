"""Worker processes of a tensor- or pipeline-parallel engine.

The engine process is rank 0. It starts ranks 1..N-1 on its host, each running the same ModelRunner over its
own shard, and feeds all of them every step plan through one broadcast ring (ipc/): workers never schedule,
they replay the engine's decisions. Tensors move between ranks through torch.distributed (NCCL on GPUs, gloo
on CPU). Ranks on other hosts (`--nnodes`) get the same plan bytes through a torch.distributed broadcast from
rank 0, since shared memory does not cross hosts.

A worker that dies takes the engine down: rank 0 could be blocked inside a collective that will never
complete, so the watcher thread logs the failure, stops the other workers, removes the rings and ends the
engine process with exit status 1. A worker whose engine is gone exits on its own."""

from __future__ import annotations

import atexit
import faulthandler
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any

import msgspec
import torch

from ringllm.engine import parallel
from ringllm.engine.config import EngineConfig
from ringllm.engine.core.plan import StepPlan, array_dec_hook, array_enc_hook
from ringllm.engine.logs import configure_logging, get_logger, no_multiprocessing_locks
from ringllm.engine.parallel import Layout
from ringllm.engine.profiler import RankProfiler
from ringllm.ipc import lifecycle
from ringllm.ipc.process import die_with_parent
from ringllm.ipc.ring import PeerDied, RingReader, RingWriter, pid_alive

log = get_logger("engine.worker")


class ControlMessage(msgspec.Struct, tag="control"):
    command: str  # stop | profile_start | profile_stop | forget_requests


# A step plan goes as the Struct it is (engine/core/plan.py declares its fields), arrays as (dtype, bytes).
_encoder = msgspec.msgpack.Encoder(enc_hook=array_enc_hook)
_decoder = msgspec.msgpack.Decoder(StepPlan | ControlMessage, dec_hook=array_dec_hook)


def encode_plan(plan: StepPlan) -> bytes:
    return _encoder.encode(plan)


def decode_message(data) -> StepPlan | str:
    msg = _decoder.decode(data)
    return msg.command if isinstance(msg, ControlMessage) else msg


def no_cuda_reason(device: str) -> str | None:
    """Why `device` cannot be used when it names CUDA and torch has none (or None): a clear message instead
    of torch's "Torch not compiled with CUDA enabled" AssertionError from deep inside the model build."""
    if not device.startswith("cuda") or torch.cuda.is_available():
        return None
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"--device {device}: this torch ({torch.__version__}, {build}) sees no CUDA GPU; use --device cpu (or auto)"


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if (why := no_cuda_reason(config.device)) is not None:
        raise ValueError(why)
    ids = config.device_ids or list(range(torch.cuda.device_count()))
    if local_rank >= len(ids):
        raise ValueError(
            f"rank needs GPU #{local_rank} on this host but only {len(ids)} are available or listed in --device-ids"
        )
    return torch.device("cuda", ids[local_rank])


def init_method(config: EngineConfig) -> str:
    return f"tcp://{config.master_addr}:{config.nccl_port}"


def join(config: EngineConfig, rank: int, device: torch.device) -> Layout:
    """Joins the engine's process group as `rank` (every rank calls this, rank 0 included)."""
    lay = Layout(config.tp_size, config.pp_size, rank, config.nnodes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel.init(lay, "nccl" if device.type == "cuda" else "gloo", init_method(config))
    return lay


def ranks_per_node(config: EngineConfig) -> int:
    world = config.tp_size * config.pp_size
    if world % config.nnodes:
        raise ValueError(f"tp_size x pp_size = {world} ranks do not split evenly over {config.nnodes} nodes")
    return world // config.nnodes


# ---- the engine's side ----
class Workers:
    """Starts this host's workers, sends them each plan, and watches that none dies."""

    def __init__(self, config: EngineConfig, model_path: Path, first_rank: int = 1):
        self.config = config
        self.remote = config.nnodes > 1  # ranks on other hosts read plans from a broadcast, not the ring
        local = range(first_rank, ranks_per_node(config))  # the engine runs on node 0
        self.ring = RingWriter(
            lifecycle.segment_name(os.getpid(), "plans"),
            capacity=1 << 24,
            num_readers=max(1, len(local)),
            timeout=600.0,
        )
        lifecycle.own(self.ring)
        ctx = mp.get_context("spawn")
        self.procs = {}
        for i, rank in enumerate(local):
            proc = ctx.Process(
                target=worker_main,
                name=f"ringllm-rank{rank}",
                daemon=True,
                args=(config, str(model_path), rank, rank, self.ring.name, i, os.getpid()),
            )
            proc.start()
            self.procs[rank] = proc
        self._closing = self._closed = False
        atexit.register(self.close)  # before multiprocessing's own exit hook kills them, which is no failure
        threading.Thread(target=self._watch, name="ringllm-worker-watch", daemon=True).start()

    def send(self, plan: StepPlan) -> None:
        self._publish(encode_plan(plan))

    def control(self, command: str) -> None:
        self._publish(_encoder.encode(ControlMessage(command)))

    def _publish(self, data: bytes) -> None:
        if self.procs:
            self.ring.write(data)
        if self.remote:
            parallel.broadcast_bytes(data)

    def request_stop(self) -> None:
        """Asks every worker to finish the steps it was sent and exit; `close` waits for them."""
        if self._closing:
            return
        self._closing = True
        try:
            self.control("stop")
        except Exception:  # a worker already gone: the kill in close() handles the rest
            log.warning("could not ask the workers to stop", exc_info=True)

    def close(self, timeout: float = 10.0) -> None:
        """Stops every worker: asks first, kills whoever has not exited by `timeout`."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.request_stop()
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
        self.ring.close(unlink=True)

    def _watch(self) -> None:
        # Process sentinels are ints; multiprocessing's wait() is typed for connections and sockets too.
        sentinels: dict[Any, int] = {p.sentinel: rank for rank, p in self.procs.items()}
        while sentinels:
            for s in wait_any(list(sentinels)):
                rank = sentinels.pop(s)
                if self._closing:
                    continue
                code = self.procs[rank].exitcode
                log.error("worker died: stopping the engine", rank=rank, exitcode=code)
                for p in self.procs.values():
                    if p.is_alive():
                        p.kill()
                lifecycle.cleanup()
                os._exit(1)


# ---- the worker's side ----
def worker_main(
    config: EngineConfig,
    model_path: str,
    rank: int,
    local_rank: int,
    ring_name: str | None,
    reader: int,
    engine_pid: int | None,
) -> None:
    """One rank. On the engine's host it reads plans from the ring and follows the engine's pid; on another
    host (ring_name None) plans arrive through torch.distributed, and a lost engine surfaces as a failed
    collective."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the engine stops this rank
    die_with_parent(name=f"ringllm-rank{rank}")  # and a rank never outlives the process that started it
    no_multiprocessing_locks()
    configure_logging(config.log_level)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack
    if engine_pid is not None:
        threading.Thread(target=_exit_with, args=(engine_pid,), name="engine-watch", daemon=True).start()
    from ringllm.engine.loader import read_config
    from ringllm.engine.runner.model_runner import ModelRunner

    device = rank_device(config, local_rank)
    lay = join(config, rank, device)
    runner = ModelRunner(config, Path(model_path), read_config(Path(model_path)), device, lay)
    serve_plans(runner, RingReader(ring_name, index=reader) if ring_name else None)


def serve_plans(runner, ring: RingReader | None) -> None:
    """Runs every plan the engine sends until it says stop."""
    messages: list = []
    config = runner.config
    profiler = RankProfiler(config.profile_dir, runner.layout.rank, runner.device, config.profile_max_mb << 20)
    while True:
        if ring is None:
            messages.append(decode_message(parallel.broadcast_bytes(None)))
        else:
            try:
                ring.wait()
            except PeerDied:
                log.error("the engine has gone; worker exiting", rank=runner.layout.rank)
                os._exit(1)
            ring.poll(lambda view: messages.append(decode_message(view)))
        for msg in messages:
            if isinstance(msg, StepPlan):
                with torch.inference_mode():
                    runner.sample(runner.forward(msg))
            elif msg == "stop":
                # Exit without tearing down the communicators: this rank's queued steps are done once close()
                # returns, rank 0 aborts its own side after this process has gone, and the driver frees the rest.
                runner.close()
                log.info("worker stopped", rank=runner.layout.rank)
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(0)
            elif msg == "forget_requests":  # the start-up warm-up is over (engine/runner/warmup.py)
                runner.forget_requests()
            elif msg == "profile_start":
                profiler.start()
            elif msg == "profile_stop":
                profiler.stop()
        messages.clear()


def _exit_with(pid: int) -> None:
    """A worker whose engine has gone ends too, even if it is blocked in a collective."""
    while pid_alive(pid):
        time.sleep(0.2)
    os._exit(1)


def run_node(config: EngineConfig, model_path: Path) -> int:
    """What a host with node_rank > 0 runs: its share of the ranks, fed by rank 0 over torch.distributed.
    Returns once they all exit (the engine stopped them, or a failure did)."""
    per = ranks_per_node(config)
    first = per * config.node_rank
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=worker_main,
            name=f"ringllm-rank{rank}",
            args=(config, str(model_path), rank, rank - first, None, 0, None),
        )
        for rank in range(first, first + per)
    ]
    for p in procs:
        p.start()
    log.info("node started", node_rank=config.node_rank, ranks=f"{first}-{first + per - 1}", master=init_method(config))
    for p in procs:
        p.join()
    return max(p.exitcode or 0 for p in procs)
