"""The engine core: admits requests, runs the step loop with overlap, checks stop conditions and reports
tokens. Transport-agnostic: the offline LLM drives it from a thread, the server's engine process from the
ring buffers.

A step is launched in two phases, in plain sight in `step()`: the runner queues its forward on the device,
then samples it; in between, a batch with constrained rows (structured outputs) gets its grammar masks, which
depend on the tokens of the steps still in flight, so those are read back first (while the forward runs).

Overlap: `step()` schedules and launches step N+1 first, and only then reads step N's tokens, appends them,
checks stops and frees what finished. The device therefore never waits on this Python. With
`disable_overlap_schedule` a step is launched and read back before the next is scheduled.

Why one file of ~420 lines: it is the step loop and the request lifecycle it drives (admission, grammar waits,
stops, aborts, outputs); what is not that lives elsewhere (core/ schedules, runner/ runs, sampler/ samples)."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from ringllm.engine import determinism, parallel
from ringllm.engine.config import EngineConfig, check_context_len
from ringllm.engine.core.plan import Batch
from ringllm.engine.core.scheduler import Scheduler
from ringllm.engine.core.sequence import Sequence, Status
from ringllm.engine.grammar import CompileQueueFull, GrammarError, Grammars
from ringllm.engine.grammar_schema import ConstraintRefused, check_constraint
from ringllm.engine.loader import checkpoint_path, read_config
from ringllm.engine.logs import get_logger
from ringllm.engine.parallel import Layout
from ringllm.engine.profiler import RankProfiler
from ringllm.engine.runner.model_runner import ModelRunner
from ringllm.engine.runner.warmup import WarmupReport, wants_warmup, warm_up
from ringllm.engine.sampler import GrammarMask
from ringllm.engine.sampling_params import SamplingParams
from ringllm.engine.step_result import StepResult, file_prompt_logprobs
from ringllm.engine.worker import Workers, join, no_cuda_reason, rank_device
from ringllm.ipc.sampling import FieldError, check_token_ids
from ringllm.text.tokenizer import transformers_tokenizer

log = get_logger("engine")
GRAMMAR_POLL_SECONDS = 1e-3  # how long an otherwise idle step waits for a grammar to compile


@dataclass
class TokenOutput:
    """One request's progress in one step: a new token (or none, for an abort), and the finish reason once
    it ends."""

    rid: str
    token_id: int | None
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served (at the request's first admission)
    # With the first token of a request that asked for them: (logprob, top k) of prompt tokens 1, 2, ...
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    prompt_ranks: list[int] | None = None  # with prompt_logprobs: each of those prompt tokens' rank
    error: str | None = None  # with finish_reason "error": why (refused before it ran, or over its grammar budget)


class RequestError(ValueError):
    """A request the engine cannot serve (the message says why); nothing was queued."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if (why := no_cuda_reason(name)) is not None:
        raise ValueError(why)
    return torch.device(name)


class Engine:
    def __init__(self, config: EngineConfig):
        started = time.perf_counter()
        self.config = config
        if config.node_rank != 0:
            raise ValueError("the engine runs on node 0; other nodes run their ranks with engine.worker.run_node")
        self.model_path = checkpoint_path(config.model, config.download_dir)
        hf_config = read_config(self.model_path)
        check_context_len(config, hf_config.get("max_position_embeddings"))
        self.workers = None
        self.layout = Layout()
        if config.tp_size * config.pp_size > 1:
            self.workers = Workers(config, self.model_path)  # they start loading while rank 0 joins
            self.device = rank_device(config, 0)
        else:
            self.device = pick_device(config.device)
        try:
            if self.workers is not None:
                self.layout = join(config, 0, self.device)
            self.runner = ModelRunner(config, self.model_path, hf_config, self.device, self.layout)
        except BaseException:
            self.close()
            raise
        self.vocab_size = self.runner.shape.vocab_size
        self.eos_token_ids = set(self.runner.eos_token_ids)
        self.scheduler = Scheduler(
            num_slots=self.runner.num_slots,
            max_rows=self.runner.max_rows,
            context_len=self.runner.context_len,
            max_bs=config.max_bs,
            max_batched_tokens=config.max_num_batched_tokens,
            use_radix_cache=not config.disable_radix_cache,
            num_groups=config.pp_size,
            # deterministic inference runs no cascade attention (engine/determinism.py)
            group_shared_prefixes=not (config.disable_cascade_attention or config.enable_deterministic_inference),
            by_priority=config.scheduling_policy == "priority",
        )
        # Steps launched but not yet read back: one with overlap, one per pipeline stage under PP.
        self.depth = config.pp_size if not config.disable_overlap_schedule else 0
        self.seqs: dict[str, Sequence] = {}
        self._in_flight: deque[tuple[Batch, StepResult]] = deque()
        # Structured outputs: requests waiting for their grammar to compile, and the matchers of admitted ones.
        self.grammars = Grammars(
            lambda: transformers_tokenizer(config.tokenizer or self.model_path),
            self.vocab_size,
            sorted(self.eos_token_ids),
            cache_bytes=config.grammar_cache_mb * 1024 * 1024,
            mask_budget=config.grammar_mask_budget_ms / 1000,
            compile_timeout=config.grammar_compile_timeout,
        )
        self._compiling: list[tuple[Sequence, Future]] = []
        self._matchers: dict[str, object] = {}
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0
        # Before warm-up, whose steps ask it whether a profile ended; a profile starts after it (config.profile).
        self._profiler = RankProfiler(config.profile_dir, self.layout.rank, self.device, config.profile_max_mb << 20)
        # Before ready: every kernel a workload hits compiled and loaded (engine/runner/warmup.py).
        self.warmup: WarmupReport | None = None
        if wants_warmup(config, self.device):
            try:
                self.warmup = warm_up(self)
            except BaseException:
                self.close()
                raise
        log.info(
            "engine started",
            seconds=round(time.perf_counter() - started, 3),
            warmup_seconds=round(self.warmup.seconds, 3) if self.warmup else None,
        )
        if config.profile:
            self.start_profile()

    @property
    def max_seq_len(self) -> int:
        return self.scheduler.max_seq_len

    # ---- requests ----
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises RequestError for what this engine cannot serve. The parameters' own bounds were checked when
        they were built or decoded (ipc/sampling.py); what is left depends on this engine."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this engine takes at most "
                f"{self.max_seq_len - 1} (context length {self.max_seq_len}, one for the output)"
            )
        try:
            check_token_ids(self.vocab_size, [prompt_ids], params)
        except FieldError as e:
            raise RequestError(str(e)) from None
        if params.priority and not self.scheduler.by_priority:
            raise RequestError(
                f"priority {params.priority}: this server schedules first come, first served "
                "(--scheduling-policy priority orders requests by priority)"
            )
        if params.bad_words and params.bad_words_token_ids is None:
            raise RequestError("bad_words reach the engine as bad_words_token_ids (text/bad_words.py tokenizes them)")
        if params.structured_outputs is not None and not self.layout.is_sampler:
            raise RequestError("structured_outputs need the sampler in the engine process (pp_size 1)")
        if params.structured_outputs is not None:
            kind, text, _ = params.structured_outputs.key
            try:
                check_constraint(kind, text)
            except ConstraintRefused as e:
                raise RequestError(str(e)) from None

    def check_grammar(self, params: SamplingParams) -> None:
        """Compiles a constrained request's grammar now, in the caller's thread (the offline API does, so that a
        bad one raises RequestError before anything is queued); the engine then finds it compiled."""
        if params.structured_outputs is not None:
            try:
                self.grammars.compile(params.structured_outputs).result()
            except GrammarError as e:
                raise RequestError(str(e)) from None

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if rid in self.seqs:
            raise RequestError(f"request id {rid!r} is already in use")
        if self.config.enable_deterministic_inference:
            params = determinism.request_params(params, self.config.seed)
        self.check_request(prompt_ids, params)
        if len(self.scheduler.waiting) + len(self._compiling) >= self.config.max_waiting_requests:
            raise RequestError(f"the waiting queue is full ({self.config.max_waiting_requests} requests)")
        seq = Sequence(rid, prompt_ids, params)
        if params.structured_outputs is not None:  # it joins the queue once its grammar is compiled
            # Requests waiting for grammars take at most a quarter of the waiting queue, so that held compiles
            # (a fan-out of prompts x n on a slow grammar) cannot fill it for everyone else.
            if len(self._compiling) >= max(1, self.config.max_waiting_requests // 4):
                raise RequestError(f"the grammar compile queue is full ({len(self._compiling)} requests wait)")
            try:
                future = self.grammars.compile(params.structured_outputs)
            except CompileQueueFull as e:
                raise RequestError(str(e)) from None
            self._compiling.append((seq, future))
        else:
            self.scheduler.add(seq)
        self.seqs[rid] = seq

    def abort(self, rid: str) -> TokenOutput | None:
        seq = self.seqs.pop(rid, None)
        if seq is None or seq.status is Status.FINISHED:
            return None
        self._matchers.pop(rid, None)
        compiling = [c for c in self._compiling if c[0] is seq]
        if compiling:
            self._compiling.remove(compiling[0])
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
            future = compiling[0][1]
            if not any(f is future for _, f in self._compiling):  # nobody else waits for it: stop it
                self.grammars.abandon(seq.params.structured_outputs, future)
        else:
            self.scheduler.finish(seq, "abort")
        return TokenOutput(rid, None, "abort", num_prompt_tokens=seq.num_prompt)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._in_flight) or bool(self._compiling)

    # ---- the loop ----
    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """One turn of the loop. Queue the next step's forward on the device; if it holds constrained rows, read
        back the steps still in flight (their tokens decide the grammar masks) and build the masks while the
        forward runs; sample. Then read back the steps launched more than `depth` ago (or, with nothing to
        launch, the oldest one, so that finished work surfaces)."""
        outputs = self._admit_compiled() if self._compiling else []
        batch = self.scheduler.schedule()
        if batch is not None:
            if self.workers is not None:
                self.workers.send(batch.plan)
            forward = self.runner.forward(batch.plan)
            mask = None
            if self._matchers and self._constrained(batch):
                outputs += self._read_back(len(self._in_flight))
                mask, over_budget = self._grammar_mask(batch)
                outputs += [self._fail(batch.seqs[i], why) for i, why in over_budget.items()]
            result = self.runner.sample(forward, mask)
            assert result is not None  # the engine is rank 0, which gets every step's tokens
            self._in_flight.append((batch, result))
            outputs += self._read_back(len(self._in_flight) - self.depth)
        elif self._in_flight:
            outputs += self._read_back(1)
        elif self._compiling and not outputs:  # only grammars to wait for: do not spin
            wait([f for _, f in self._compiling], timeout=GRAMMAR_POLL_SECONDS, return_when=FIRST_COMPLETED)
        if batch is not None and self._profiler.step():  # a profile recorded its last step: its trace is bounded
            self.stop_profile()
        return outputs

    def _read_back(self, num_steps: int) -> list[TokenOutput]:
        """Reads back the oldest `num_steps` steps in flight (none when num_steps <= 0), oldest first."""
        outputs: list[TokenOutput] = []
        for _ in range(num_steps):
            outputs += self._finish_step(*self._in_flight.popleft())
        return outputs

    def _finish_step(self, batch: Batch, result: StepResult) -> list[TokenOutput]:
        """A step read back: each kept token appended, its stop conditions checked, finished requests ended."""
        sample = result.wait()
        tokens, lp, top = sample.tokens, sample.logprobs, sample.top
        plan = batch.plan
        self.num_prompt_tokens_computed += plan.num_tokens - plan.num_decodes
        if sample.prompt is not None:
            file_prompt_logprobs(batch.seqs, plan, sample.prompt)
        outputs = []
        # Python ints and bools once, not a numpy scalar per row (a batch-1 decode step is host-bound)
        for i, (seq, kept, token) in enumerate(zip(batch.seqs, plan.sample.tolist(), tokens.tolist())):
            if not kept:
                continue
            seq.num_pending -= 1
            if seq.status is Status.FINISHED:
                continue  # finished (or aborted) while this step ran: its extra token is dropped
            seq.token_ids.append(token)
            self.num_generated_tokens += 1
            matcher = self._matchers.get(seq.rid) if self._matchers else None
            reason = self._stop_reason(seq, token) if matcher is None else self._constrained_stop(seq, token, matcher)
            out = TokenOutput(
                seq.rid, token, reason, num_prompt_tokens=seq.num_prompt, num_cached_tokens=seq.prompt_cache_hit
            )
            k = seq.params.logprobs
            if k is not None and lp is not None:
                out.logprob = lp[i]
                out.top_logprobs = list(zip(top[0][i][:k], top[1][i][:k])) if top and k else []
            if seq.params.prompt_logprobs is not None and len(seq.token_ids) == seq.num_prompt + 1:
                out.prompt_logprobs, out.prompt_ranks = seq.prompt_logprobs, seq.prompt_ranks
            if out.finish_reason:
                self.scheduler.finish(seq, out.finish_reason)
                del self.seqs[seq.rid]
                if matcher is not None:
                    del self._matchers[seq.rid]
            outputs.append(out)
        return outputs

    def _constrained_stop(self, seq: Sequence, token: int, matcher) -> str | None:
        """A constrained request ends with "stop" once its grammar is complete (ignore_eos or not)."""
        if not matcher.accept_token(token):  # the mask allowed only tokens the grammar accepts
            log.error("a constrained request sampled a token its grammar refuses", rid=seq.rid, token=token)
            return "error"
        return "stop" if matcher.is_terminated() else self._stop_reason(seq, token)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in (p.stop_token_ids or ()) or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        known = len(seq.token_ids)  # pending tokens of a later step do not count yet
        if known - seq.num_prompt >= p.max_tokens or known >= self.max_seq_len:
            return "length"
        return None

    # ---- structured outputs ----
    def _admit_compiled(self) -> list[TokenOutput]:
        """Queues the requests whose grammar is ready; those whose grammar failed end with its error."""
        outputs, still = [], []
        for seq, future in self._compiling:
            if not future.done():
                still.append((seq, future))
            elif future.exception() is not None:
                del self.seqs[seq.rid]
                seq.status, seq.finish_reason = Status.FINISHED, "error"
                outputs.append(
                    TokenOutput(seq.rid, None, "error", num_prompt_tokens=seq.num_prompt, error=str(future.exception()))
                )
            else:
                self._matchers[seq.rid] = self.grammars.matcher(future.result())
                self.scheduler.add(seq)
        self._compiling = still
        return outputs

    def _constrained(self, batch: Batch) -> bool:
        return any(s.rid in self._matchers for s in batch.seqs)

    def _fail(self, seq: Sequence, why: str) -> TokenOutput:
        """Ends a running request with finish_reason "error" and `why`; a token of its still in flight is
        dropped when read back, like an abort's."""
        self._matchers.pop(seq.rid, None)
        del self.seqs[seq.rid]
        self.scheduler.finish(seq, "error")
        log.warning("request ended with an error", rid=seq.rid, error=why)
        return TokenOutput(seq.rid, None, "error", num_prompt_tokens=seq.num_prompt, error=why)

    def _grammar_mask(self, batch: Batch) -> tuple[GrammarMask | None, dict[int, str]]:
        """The grammar masks of the batch's sampled constrained rows, from their matchers (which must have
        accepted every token before this step's: the steps in flight are read back first), and the rows whose
        mask ran over its budget (engine/grammar.py), with their error."""
        sampled = batch.plan.sample
        return self.grammars.masks(
            [self._matchers.get(s.rid) if sampled[i] else None for i, s in enumerate(batch.seqs)], self.device
        )

    # ---- shutdown ----
    def close(self) -> None:
        """Stops the worker processes of a parallel engine: they finish the steps already sent and exit, and
        only then does this rank leave the process group (nothing to do on one device)."""
        workers, self.workers = self.workers, None
        if workers is not None:
            workers.request_stop()
        runner = getattr(self, "runner", None)  # absent when the constructor failed
        if runner is not None:
            runner.close()
        if getattr(self, "grammars", None) is not None:
            self.grammars.close()
        if workers is not None:
            workers.close()
        parallel.shutdown()

    # ---- profiling ----
    @property
    def profiling(self) -> bool:
        return self._profiler.running

    def start_profile(self, max_steps: int | None = None) -> bool:
        """Starts the torch profiler on every rank (CPU, and CUDA where present) for at most `max_steps` steps;
        `stop_profile` writes the traces. False when this process's trace budget is spent (engine/profiler.py)."""
        if self._profiler.running:
            return True
        if not self._profiler.start(max_steps):
            log.warning("profile refused: the trace budget is spent", written=self._profiler.written)
            return False
        if self.workers is not None:
            self.workers.control("profile_start")
        log.info("profiler started", profile_dir=self.config.profile_dir, max_steps=max_steps)
        return True

    def stop_profile(self) -> Path | None:
        """Stops the profiler and writes a Chrome trace per rank into profile_dir; returns rank 0's path."""
        if not self._profiler.running:
            return None
        path = self._profiler.stop()
        if self.workers is not None:
            self.workers.control("profile_stop")
        log.info("profiler trace written", path=str(path))
        return path

    # ---- introspection ----
    def stats(self) -> dict:
        s, cache = self.scheduler, self.scheduler.cache
        return {
            "running": len(s.running),
            "waiting": len(s.waiting) + len(self._compiling),  # with grammars to compile
            "kv_slots_total": s.allocator.capacity,
            "kv_slots_used": s.num_slots_used,
            "kv_slots_cached": cache.cached_tokens if cache else 0,
            "kv_slots_used_by_requests": s.num_slots_used - (cache.cached_tokens if cache else 0),
            "prefix_cache_hit_rate": cache.hit_rate if cache else 0.0,
            "prefix_cache_hit_tokens": cache.hit_tokens if cache else 0,
            "prefix_cache_query_tokens": cache.query_tokens if cache else 0,
            "generated_tokens": self.num_generated_tokens,
            "prompt_tokens_computed": self.num_prompt_tokens_computed,
            "preemptions": s.num_preemptions,
            "profiler_running": int(self.profiling),  # how /start_profile learns that a start was refused
        }
