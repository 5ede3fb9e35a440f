"""The engine process of `ringllm serve`: one Engine fed by the app workers' request rings, answering on
their output rings. Each step's tokens go back as one StepOutput frame per app worker.

SIGTERM drains: new requests are refused with 503 while the running ones finish; the process exits once none
is left, or when the shutdown timeout runs out."""

from __future__ import annotations

import faulthandler
import os
import signal
import time


from engine.config import EngineConfig
from engine.engine import Engine, RequestError, TokenOutput
from engine.logs import configure_logging, get_logger
from engine.request_stats import RequestStats
from ipc import messages as m
from ipc.lifecycle import RingPair, cleanup, create_claim_counter, create_metrics_table, remove_stale_segments
from ipc.ring import RingError

log = get_logger("engine.server")
IDLE_SPIN_SECONDS = 2e-3
IDLE_SLEEP_SECONDS = 5e-4


class EngineServer:
    def __init__(self, config: EngineConfig, num_workers: int, shutdown_timeout: float = 30.0):
        self.engine = Engine(config)
        self.shutdown_timeout = shutdown_timeout
        self.drain_deadline: float | None = None  # set by SIGTERM
        pid = os.getpid()
        self.pairs = [RingPair(pid, i) for i in range(num_workers)]
        create_metrics_table(pid, num_workers)
        create_claim_counter(pid)
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
            log.info("draining: new requests are refused", running=len(self.engine.seqs),
                     timeout_s=self.shutdown_timeout)

    def _drained(self) -> bool:
        """Draining, and nothing left to finish (or no time left to finish it in)."""
        if self.drain_deadline is None:
            return False
        if self.engine.has_work and time.monotonic() < self.drain_deadline:
            return False
        log.info("drained" if not self.engine.has_work else "shutdown timeout: stopping with requests left",
                 left=len(self.engine.seqs))
        return True

    def serve_forever(self) -> None:
        idle_since = None
        while self.running and not self._drained():
            got = sum(pair.requests.poll(lambda view, i=i: self._on_message(i, view)) for i, pair in enumerate(self.pairs))
            if self.engine.has_work:
                self._route(self.engine.step())
                idle_since = None
            elif not got:
                idle_since = idle_since or time.perf_counter()
                if time.perf_counter() - idle_since > IDLE_SPIN_SECONDS:
                    time.sleep(IDLE_SLEEP_SECONDS)
            self._flush()
        self._fail_unfinished()

    def _fail_unfinished(self) -> None:
        """Requests still running when the drain ran out of time end with an error their clients can see."""
        for rid, worker in self.owner.items():
            self.failed.append((worker, m.RequestFailed(rid, m.CUT_BY_SHUTDOWN, 503)))
        self.owner.clear()
        self._flush()

    def _on_message(self, worker: int, view) -> None:
        msg = m.decode_to_engine(view)
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
                self.engine.start_profile()
            elif msg.command == "profile_stop":
                self.engine.stop_profile()
            stats = {**self.engine.stats(), **self.request_stats.values()}
            self.pairs[worker].outputs.write(m.encode(m.EngineStats({k: float(v) for k, v in stats.items()})))

    def _route(self, outputs: list[TokenOutput]) -> None:
        for out in outputs:
            worker = self.owner.get(out.rid)
            if worker is None:
                continue
            ids = m.pack_ids([out.token_id]) if out.token_id is not None else b""
            lp = [out.logprob] if out.logprob is not None else None
            top = [out.top_logprobs] if out.top_logprobs is not None else None
            delta = m.TokenDelta(out.rid, ids, out.finish_reason, lp, out.num_prompt_tokens, out.num_cached_tokens, top)
            if out.prompt_logprobs is not None:
                delta.prompt_logprobs = [p_lp for p_lp, _ in out.prompt_logprobs]
                delta.prompt_top_logprobs = [p_top for _, p_top in out.prompt_logprobs]
            self.pending.setdefault(worker, []).append(delta)
            if out.token_id is not None:
                self.request_stats.token(out.rid)
            if out.finish_reason:
                del self.owner[out.rid]
                self.request_stats.finished(out.rid)

    def _flush(self) -> None:
        if self.drain_deadline is not None and not self.drain_announced:
            self.drain_announced = True
            for pair in self.pairs:
                pair.outputs.write(m.encode(m.Draining()))
        for worker, failure in self.failed:
            self.pairs[worker].outputs.write(m.encode(failure))
        self.failed.clear()
        for worker, items in self.pending.items():
            if items:
                self.pairs[worker].outputs.write(m.encode(m.StepOutput(items)))
        self.pending.clear()


def run_engine_process(config: EngineConfig, num_workers: int, ready, shutdown_timeout: float = 30.0) -> None:
    """Target of the engine process: puts a dict describing the model on the `ready` queue once the rings
    exist and the model is loaded (or {"error": ...} if it could not start)."""
    configure_logging(config.log_level)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack
    removed = remove_stale_segments()
    if removed:
        log.info("removed stale ring segments", count=len(removed))
    server = None
    try:
        try:
            server = EngineServer(config, num_workers, shutdown_timeout)
        except (ValueError, OSError) as e:
            ready.put({"error": str(e)})
            raise SystemExit(2)
        ready.put({"pid": os.getpid(), "model_path": str(server.engine.model_path),
                   "max_seq_len": server.engine.max_seq_len, "vocab_size": server.engine.vocab_size,
                   "kv_slots": server.engine.scheduler.allocator.capacity})
        log.info("engine ready", workers=num_workers, kv_slots=server.engine.scheduler.allocator.capacity)
        signal.signal(signal.SIGTERM, server.drain)
        server.serve_forever()
    except RingError as e:
        log.error("engine stopped: an app worker's ring failed", error=str(e))
        raise SystemExit(1)
    finally:
        if server is not None:
            server.engine.close()
        cleanup()
