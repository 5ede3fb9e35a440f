"""The engine process of `ringllm serve`: one Engine fed by the app workers' request rings, answering on
their output rings. Each step's tokens go back as one StepOutput frame per app worker.

SIGTERM drains: new requests are refused with 503 while the running ones finish; the process exits once none
is left, or when the shutdown timeout runs out."""

from __future__ import annotations

import faulthandler
import os
import signal
import time

import msgspec

from ringllm.engine.config import EngineConfig
from ringllm.engine.engine import Engine, RequestError, TokenOutput
from ringllm.engine.logs import configure_logging, get_logger, no_multiprocessing_locks
from ringllm.engine.request_stats import RequestStats
from ringllm.ipc import messages as m
from ringllm.ipc.heartbeat import HeartbeatWriter
from ringllm.ipc.lifecycle import (
    RingPair,
    cleanup,
    create_metrics_table,
    create_pair_claims,
    remove_stale_segments,
)
from ringllm.ipc.process import die_with_parent, parent_gone
from ringllm.ipc.ring import PeerDied, RingError, pid_alive

log = get_logger("engine.server")
IDLE_SPIN_SECONDS = 2e-3
IDLE_SLEEP_SECONDS = 5e-4


class EngineServer:
    def __init__(
        self,
        config: EngineConfig,
        num_workers: int,
        shutdown_timeout: float = 30.0,
        profiler_max_seconds: float | None = None,
        parent: int | None = None,
    ):
        self.engine = Engine(config)
        self.shutdown_timeout = shutdown_timeout
        self.profiler_max_seconds = profiler_max_seconds  # bounds a profile started by a Control message
        self.profile_started: float | None = None
        self.parent = parent  # the serve process: with it gone nobody reads the outputs, so stop at once
        self.drain_deadline: float | None = None  # set by SIGTERM
        pid = os.getpid()
        self.pairs = [RingPair(pid, i) for i in range(num_workers)]
        create_metrics_table(pid, num_workers)
        create_pair_claims(pid, num_workers)
        self.reaped = [0] * num_workers  # per pair, the pid of the dead API worker whose requests were aborted
        # Requests aborted because their API worker died: it cannot count them among /metrics' aborted requests,
        # so the engine does (requests_total{finish_reason="abort"} adds them).
        self.aborted_orphans = 0
        for k, pair in enumerate(self.pairs):  # a new worker took the pair over: its predecessor is gone
            pair.requests.on_reset = lambda k=k: self._worker_gone(k, "a new API worker took the pair over", True)
        self.heartbeat = HeartbeatWriter(pid)
        self.owner: dict[str, int] = {}  # rid -> app worker index
        self.request_stats = RequestStats()  # queue/prefill/decode times and lengths, sent with the stats
        self.pending: dict[int, list[m.TokenDelta]] = {}
        self.failed: list[tuple[int, m.RequestFailed]] = []
        self.drain_announced = False
        self.running = True

    def drain(self, *_signal_args) -> None:
        """SIGTERM's handler. It only sets the deadline: the loop tells the app workers (a signal handler must
        not write to a ring whose writer it may have interrupted)."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.shutdown_timeout
            log.info(
                "draining: new requests are refused", running=len(self.engine.seqs), timeout_s=self.shutdown_timeout
            )

    def _drained(self) -> bool:
        """Draining, and nothing left to finish (or no time left to finish it in)."""
        if self.drain_deadline is None:
            return False
        if self.engine.has_work and time.monotonic() < self.drain_deadline:
            return False
        log.info(
            "drained" if not self.engine.has_work else "shutdown timeout: stopping with requests left",
            left=len(self.engine.seqs),
        )
        return True

    def serve_forever(self) -> None:
        idle_since = None
        beat, due = self.heartbeat.beat, self.heartbeat.due
        while self.running and not self._drained():
            now = beat(self.engine.has_work)
            if due(now):
                self._every_publish(now)
            got = sum(
                pair.requests.poll(lambda view, i=i: self._on_message(i, view)) for i, pair in enumerate(self.pairs)
            )
            if self.engine.has_work:
                self._route(self.engine.step())
                idle_since = None
            elif not got:
                idle_since = idle_since or time.perf_counter()
                if time.perf_counter() - idle_since > IDLE_SPIN_SECONDS:
                    time.sleep(IDLE_SLEEP_SECONDS)
            self._flush()
        self._fail_unfinished()

    def _every_publish(self, now: float) -> None:
        """What the loop does every heartbeat.PUBLISH_SECONDS: publish the stats, stop a profile that has run
        its time, notice that the serve process has gone."""
        self.heartbeat.publish(self.stats(), now)
        limit = self.profiler_max_seconds  # profile_started is set only where there is one
        if self.profile_started is not None and limit is not None and now - self.profile_started > limit:
            log.info("profile ran its time: stopping it", seconds=self.profiler_max_seconds)
            self.profile_started = None
            self.engine.stop_profile()
        if self.parent is not None and parent_gone(self.parent):
            log.error("the serve process is gone: stopping")
            self.running = False
        self._reap_dead_workers()

    def _reap_dead_workers(self) -> None:
        """An API worker that died (SIGKILL, a crash) leaves requests nobody reads: abort them, so that they
        stop generating and free their KV. The other workers' requests go on."""
        for k, pair in enumerate(self.pairs):
            pid = pair.outputs.reader_pid()
            if pid and pid != self.reaped[k] and not pid_alive(pid):
                self.reaped[k] = pid
                self._worker_gone(k, f"API worker pid {pid} died", dead=True)

    def _worker_gone(self, k: int, why: str, dead: bool) -> None:
        """Aborts worker k's requests; `dead`: the worker is gone, so they count as aborted here (a worker that is
        only stuck still ends, and counts, its own)."""
        rids = [rid for rid, worker in self.owner.items() if worker == k]
        for rid in rids:
            out = self.engine.abort(rid)
            if out is not None:
                self._route([out])  # the end of its bookkeeping; the outputs themselves are dropped below
                self.aborted_orphans += 1 if dead else 0
            self.owner.pop(rid, None)
        self.pending.pop(k, None)
        self.failed = [(worker, f) for worker, f in self.failed if worker != k]
        if rids or "died" in why:
            log.warning("API worker gone: its requests are aborted", pair=k, why=why, aborted=len(rids))

    def _write(self, worker: int, msg) -> None:
        """Writes to a worker's output ring; a worker that died (or stays stuck past the ring's timeout) loses
        its requests, and the engine goes on serving the others."""
        try:
            self.pairs[worker].outputs.write(m.encode(msg))
        except RingError as e:
            self._worker_gone(worker, str(e), dead=isinstance(e, PeerDied))

    def _fail_unfinished(self) -> None:
        """Requests still running when the drain ran out of time end with an error their clients can see."""
        for rid, worker in self.owner.items():
            self.failed.append((worker, m.RequestFailed(rid, m.CUT_BY_SHUTDOWN, 503)))
        self.owner.clear()
        self._flush()

    def _on_message(self, worker: int, view) -> None:
        try:
            msg = m.decode_to_engine(view)
        except msgspec.ValidationError as e:  # one bad message must not stop the engine for everyone
            self._refuse_undecodable(worker, view, e)
            return
        if isinstance(msg, m.Generate):
            if self.drain_deadline is not None:
                self.failed.append((worker, m.RequestFailed(msg.rid, m.SHUTTING_DOWN, 503)))
                return
            try:
                # Decoding checked the parameters' bounds; stop strings are matched on text, in the app worker.
                self.engine.add_request(msg.rid, m.unpack_ids(msg.token_ids), msg.sampling)
                self.owner[msg.rid] = worker
                self.request_stats.arrived(msg.rid, self.engine.seqs[msg.rid])
            except (RequestError, ValueError) as e:
                status = 503 if "queue is full" in str(e) else 400
                self.failed.append((worker, m.RequestFailed(msg.rid, str(e), status)))
        elif isinstance(msg, m.Abort):
            out = self.engine.abort(msg.rid)
            if out is not None:
                self._route([out])
        elif isinstance(msg, m.Control):
            if msg.command == "profile_start":
                # a command's profile is bounded in steps, and in time from its own start
                if not self.engine.profiling and self.engine.start_profile(self.engine.config.profile_max_steps):
                    self.profile_started = time.monotonic() if self.profiler_max_seconds is not None else None
            elif msg.command == "profile_stop":
                self.profile_started = None
                self.engine.stop_profile()
            stats = {**self.stats(), **self.request_stats.values()}
            self._write(worker, m.EngineStats({k: float(v) for k, v in stats.items()}))

    def stats(self) -> dict:
        """The engine's counters and gauges, with what only the server knows."""
        return {**self.engine.stats(), "aborted_orphans": self.aborted_orphans}

    def _refuse_undecodable(self, worker: int, view, error: Exception) -> None:
        """A message that does not decode (an app worker let through what the engine cannot take): a Generate
        is answered 400 with the reason; anything else is dropped with a log line."""
        try:
            raw = msgspec.msgpack.decode(view)
        except msgspec.DecodeError:
            raw = None
        rid = raw.get("rid") if isinstance(raw, dict) and raw.get("type") == "gen" else None
        log.error("undecodable message from an app worker", worker=worker, rid=rid, error=str(error))
        if isinstance(rid, str):
            self.failed.append((worker, m.RequestFailed(rid, f"the engine cannot take this request: {error}", 400)))

    def _route(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            worker = self.owner.get(out.rid)
            if worker is None:
                continue
            if out.error is not None:  # a grammar that does not compile, or ran over its mask budget: a 400
                self.failed.append((worker, m.RequestFailed(out.rid, out.error, 400)))
                del self.owner[out.rid]
                self.request_stats.forget(out.rid)
                continue
            ids = m.pack_ids([out.token_id]) if out.token_id is not None else b""
            lp = [out.logprob] if out.logprob is not None else None
            top = [out.top_logprobs] if out.top_logprobs is not None else None
            delta = m.TokenDelta(out.rid, ids, out.finish_reason, lp, out.num_prompt_tokens, out.num_cached_tokens, top)
            if out.prompt_logprobs is not None:
                delta.prompt_logprobs = [p_lp for p_lp, _ in out.prompt_logprobs]
                delta.prompt_top_logprobs = [p_top for _, p_top in out.prompt_logprobs]
                delta.prompt_ranks = out.prompt_ranks
            self.pending.setdefault(worker, []).append(delta)
            if out.token_id is not None:
                self.request_stats.token(out.rid)
            if out.finish_reason:
                del self.owner[out.rid]
                self.request_stats.finished(out.rid)
        self.request_stats.end_iteration()

    def _flush(self) -> None:
        if self.drain_deadline is not None and not self.drain_announced:
            self.drain_announced = True
            for worker in range(len(self.pairs)):
                self._write(worker, m.Draining())
        failed, self.failed = self.failed, []
        for worker, failure in failed:
            self._write(worker, failure)
        pending, self.pending = self.pending, {}
        for worker, items in pending.items():
            if items:
                self._write(worker, m.StepOutput(items))


def run_engine_process(
    config: EngineConfig,
    num_workers: int,
    ready,
    shutdown_timeout: float = 30.0,
    profiler_max_seconds: float | None = None,
) -> None:
    """Target of the engine process: sends a dict describing the model through the `ready` pipe once the rings
    exist and the model is loaded (or {"error": ...} if it could not start). A pipe, not a multiprocessing
    queue: a queue's named semaphores (sem.mp-*) outlive a kill -9 of the whole process group.

    The engine ends with the serve process (SIGTERM when it dies, then the loop stops at once); SIGINT is
    ignored, because Ctrl-C reaches the whole process group and the serve process drains the engine itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = die_with_parent(signal.SIGTERM, name="ringllm-engine")
    no_multiprocessing_locks()
    configure_logging(config.log_level)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack
    removed = remove_stale_segments()
    if removed:
        log.info("removed stale ring segments", count=len(removed))
    server = None
    try:
        try:
            server = EngineServer(config, num_workers, shutdown_timeout, profiler_max_seconds, parent)
        except (ValueError, OSError) as e:
            ready.send({"error": str(e)})
            raise SystemExit(2) from None
        # Logged and draining on SIGTERM before the launcher hears of it: it may stop this engine at once (a
        # generation_config.json it refuses), and the log should say how far the start got.
        log.info("engine ready", workers=num_workers, kv_slots=server.engine.scheduler.allocator.capacity)
        signal.signal(signal.SIGTERM, server.drain)
        ready.send(
            {
                "pid": os.getpid(),
                "model_path": str(server.engine.model_path),
                "max_seq_len": server.engine.max_seq_len,
                "vocab_size": server.engine.vocab_size,
                "kv_slots": server.engine.scheduler.allocator.capacity,
            }
        )
        server.serve_forever()
    except RingError as e:
        log.error("engine stopped: an app worker's ring failed", error=str(e))
        raise SystemExit(1) from None
    finally:
        if server is not None:
            server.engine.close()
        cleanup()
