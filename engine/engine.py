"""The engine core: admits requests, runs the step loop with overlap, checks stop conditions and reports
tokens. Transport-agnostic: the offline LLM drives it from a thread, the server's engine process from the
ring buffers.

Overlap: `step()` schedules and launches step N+1 first, and only then reads step N's tokens, appends them,
checks stops and frees what finished. The device therefore never waits on this Python. With
`disable_overlap_schedule` a step is launched and read back before the next is scheduled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.loader import read_config, resolve_model_path
from engine.logs import get_logger
from engine.model_runner import ModelRunner, StepResult
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence, Status

log = get_logger("engine")


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
    num_cached_tokens: int = 0


class RequestError(ValueError):
    """A request the engine cannot serve (the message says why); nothing was queued."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.tp_size != 1 or config.pp_size != 1:
            raise ValueError("tensor and pipeline parallelism are not built yet: use --tp-size 1 --pp-size 1")
        if config.model is None:
            from engine.demo import demo_model_path

            self.model_path = demo_model_path()
        else:
            self.model_path = resolve_model_path(config.model, config.download_dir)
        hf_config = read_config(self.model_path)
        self.device = pick_device(config.device)
        self.runner = ModelRunner(config, self.model_path, hf_config, self.device)
        self.vocab_size = self.runner.shape.vocab_size
        self.eos_token_ids = set(self.runner.shape.eos_token_ids) | _generation_eos(self.model_path)
        self.scheduler = Scheduler(
            num_slots=self.runner.num_slots, max_rows=self.runner.max_rows, context_len=self.runner.context_len,
            max_bs=config.max_bs, max_batched_tokens=config.max_num_batched_tokens,
            use_radix_cache=not config.disable_radix_cache,
        )
        self.overlap = not config.disable_overlap_schedule
        self.seqs: dict[str, Sequence] = {}
        self._in_flight: tuple[Batch, StepResult] | None = None
        self.num_generated_tokens = 0
        self.num_prompt_tokens_computed = 0
        self.rank = 0
        self._profiler = None
        if config.profile:
            self.start_profile()

    @property
    def max_seq_len(self) -> int:
        return self.scheduler.max_seq_len

    # ---- requests ----
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises RequestError (or ValueError for parameters) for what this engine cannot serve."""
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if len(prompt_ids) >= self.max_seq_len:
            raise RequestError(f"the prompt has {len(prompt_ids)} tokens; this engine takes at most "
                               f"{self.max_seq_len - 1} (context length {self.max_seq_len}, one for the output)")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        params.validate()

    def add_request(self, rid: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if rid in self.seqs:
            raise RequestError(f"request id {rid!r} is already in use")
        self.check_request(prompt_ids, params)
        if len(self.scheduler.waiting) >= self.config.max_waiting_requests:
            raise RequestError(f"the waiting queue is full ({self.config.max_waiting_requests} requests)")
        seq = Sequence(rid, prompt_ids, params)
        self.seqs[rid] = seq
        self.scheduler.add(seq)

    def abort(self, rid: str) -> TokenOutput | None:
        seq = self.seqs.pop(rid, None)
        if seq is None or seq.status is Status.FINISHED:
            return None
        self.scheduler.finish(seq, "abort")
        return TokenOutput(rid, None, "abort", num_prompt_tokens=seq.num_prompt)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    # ---- the loop ----
    def step(self) -> list[TokenOutput]:
        batch = self.scheduler.schedule()
        launched = (batch, self.runner.launch(batch.plan)) if batch else None
        outputs = self._read_back(*self._in_flight) if self._in_flight else []
        self._in_flight = launched
        if not self.overlap and launched:
            outputs += self._read_back(*launched)
            self._in_flight = None
        return outputs

    def _read_back(self, batch: Batch, result: StepResult) -> list[TokenOutput]:
        tokens, sample = result.wait()
        plan = batch.plan
        self.num_prompt_tokens_computed += plan.num_tokens - plan.num_decodes
        lp = sample.logprobs.tolist() if sample.logprobs is not None else None
        top = None
        if sample.top_ids is not None:
            top = (sample.top_ids.tolist(), sample.top_logprobs.tolist())
        outputs = []
        for i, seq in enumerate(batch.seqs):
            if not plan.sample[i]:
                continue
            seq.num_pending -= 1
            if seq.status is Status.FINISHED:
                continue  # finished (or aborted) while this step ran: its extra token is dropped
            token = int(tokens[i])
            seq.token_ids.append(token)
            self.num_generated_tokens += 1
            out = TokenOutput(seq.rid, token, self._stop_reason(seq, token), num_prompt_tokens=seq.num_prompt,
                              num_cached_tokens=seq.num_cached)
            k = seq.params.logprobs
            if k is not None and lp is not None:
                out.logprob = lp[i]
                out.top_logprobs = list(zip(top[0][i][:k], top[1][i][:k])) if top and k else []
            if out.finish_reason:
                self.scheduler.finish(seq, out.finish_reason)
                del self.seqs[seq.rid]
            outputs.append(out)
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        known = len(seq.token_ids)  # pending tokens of a later step do not count yet
        if known - seq.num_prompt >= p.max_tokens or known >= self.max_seq_len:
            return "length"
        return None

    # ---- profiling ----
    def start_profile(self) -> None:
        """Starts the torch profiler (CPU, and CUDA where present); `stop_profile` writes the trace."""
        if self._profiler is not None:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._profiler = profile(activities=activities, record_shapes=False)
        self._profiler.start()
        log.info("profiler started", profile_dir=self.config.profile_dir)

    def stop_profile(self) -> Path | None:
        """Stops the profiler and writes a Chrome trace per rank into profile_dir; returns its path."""
        if self._profiler is None:
            return None
        import time

        prof, self._profiler = self._profiler, None
        prof.stop()
        out = Path(self.config.profile_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"trace-rank{self.rank}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        prof.export_chrome_trace(str(path))
        log.info("profiler trace written", path=str(path))
        return path

    # ---- introspection ----
    def stats(self) -> dict:
        s, cache = self.scheduler, self.scheduler.cache
        return {
            "running": len(s.running), "waiting": len(s.waiting),
            "kv_slots_total": s.allocator.capacity, "kv_slots_used": s.num_slots_used,
            "kv_slots_cached": cache.cached_tokens if cache else 0,
            "kv_slots_used_by_requests": s.num_slots_used - (cache.cached_tokens if cache else 0),
            "prefix_cache_hit_rate": cache.hit_rate if cache else 0.0,
            "prefix_cache_hit_tokens": cache.hit_tokens if cache else 0,
            "generated_tokens": self.num_generated_tokens, "prompt_tokens_computed": self.num_prompt_tokens_computed,
            "preemptions": s.num_preemptions,
        }


def _generation_eos(path: Path) -> set[int]:
    f = path / "generation_config.json"
    if not f.is_file():
        return set()
    eos = json.loads(f.read_text()).get("eos_token_id")
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
