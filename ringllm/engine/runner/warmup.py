"""The start-up warm-up: before the engine reports ready, it runs the kinds of step a workload will hit, so that
the first real requests find every kernel compiled, every lazily loaded module loaded and the caching allocator
grown, and the first run in a process is as fast as the second.

What compiles or loads on first use, and why these steps reach it:
  - Triton kernels specialize on their integer arguments (1, multiples of 16, anything else) and constexprs: the
    sampler's chunk size changes at 32 rows, decode_prep and the sampler take the batch size. CUDA-graph capture
    compiles what runs inside the graphs, at the captured sizes only; these kernels run outside them.
  - Prefill and mixed steps run eagerly at any token count: FlashInfer's prefill kernels load on first use, cuBLAS
    picks its kernels per shape, and the largest step grows the caching allocator (the KV sizing emptied it).
  - The sampler's reference path (top-k/top-p, min-p, penalties, logit bias, min_tokens, seeds, logprobs, prompt
    logprobs) is a few dozen torch kernels, each loaded lazily by CUDA on its first launch.

So it runs, through the engine's own loop (engine.add_request and engine.step, the path a request takes; a
parallel engine's workers follow): prefill steps of several token counts up to max_num_batched_tokens, largest
first (`prefill`); a staircase of decode steps at every captured CUDA-graph batch size and one row below it, as
many requests finishing one step apart (`decode`); and the same staircase with every sampling feature whose
kernels differ (`sampling`). Then it leaves nothing behind: no request, an empty prefix cache (every slot free),
zeroed counters, and the row table and the sampler's noise as built (ModelRunner.forget_requests), so an engine
started with it gives the same results as one started without.

Bounded: a few hundred small steps (about a second on a 0.6B model on an H100 once kernels are cached).
EngineConfig.warmup turns it off ("off") or on where no kernel compiles ("on"; "auto": on CUDA only)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ringllm.engine.logs import get_logger
from ringllm.engine.runner.cuda_graph import batch_buckets
from ringllm.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from ringllm.engine.config import EngineConfig
    from ringllm.engine.engine import Engine

log = get_logger("engine.warmup")

SMALLEST_PREFILL = 16  # the prefill sizes are powers of two from here up to the step's token budget
STAIRCASE_PROMPT = 8  # prompt length of each decode-staircase request (fewer when the token budget is small)
# The sampling features whose kernels differ, spread over the rows of the `sampling` staircase (row i gets
# FEATURES[i % len]), so that every step of it mixes them as a real batch would.
FEATURES: dict[str, dict] = {
    "top_k_top_p": dict(top_k=20, top_p=0.9),
    "min_p_seeded": dict(min_p=0.05, seed=7),
    "penalties": dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
    "logprobs": dict(logprobs=5),
    "logit_bias": dict(logit_bias={1: 1.0}),
    "min_tokens": dict(stop_token_ids=[0]),  # min_tokens is set to the row's max_tokens: token 0 never ends it
    "seeded": dict(seed=11),
}


def wants_warmup(config: EngineConfig, device: torch.device) -> bool:
    """Whether an engine on `device` warms up at start: "auto" where kernels compile on first use (CUDA)."""
    return config.warmup == "on" or (config.warmup == "auto" and device.type == "cuda")


@dataclass
class WarmupPlan:
    prefill_tokens: list[int]  # the token count of each prefill step, largest first
    decode_batches: list[int]  # the batch size of each decode step of a staircase, largest first
    staircase_prompt: int  # prompt length of each staircase request
    features: list[str]  # the sampling features of the `sampling` staircase's rows


@dataclass
class WarmupPart:
    name: str
    steps: int
    seconds: float
    compiled: list[str] = field(default_factory=list)  # Triton kernels compiled (or loaded from disk) in it


@dataclass
class WarmupReport:
    plan: WarmupPlan
    parts: list[WarmupPart]
    seconds: float


def plan_warmup(config: EngineConfig, max_seq_len: int, num_slots: int) -> WarmupPlan:
    """The steps of the warm-up for an engine whose KV pool has `num_slots` free slots: prefill token counts
    (powers of two from SMALLEST_PREFILL, the full budget and one below it, which is not a multiple of 16) and
    decode batch sizes (every CUDA-graph bucket of max_bs and the size one below each), within what the pool,
    the context and the batch limits hold."""
    budget = max(1, min(config.max_num_batched_tokens, num_slots // 2, (max_seq_len - 1) * config.max_bs))
    sizes = {budget, max(1, budget - 1)}
    n = SMALLEST_PREFILL
    while n < budget:
        sizes.add(n)
        n *= 2
    buckets = batch_buckets(config.max_bs)
    batches = sorted(set(buckets) | {b - 1 for b in buckets if b > 1}, reverse=True)
    # a staircase request's prompt and its len(batches) + 1 tokens fit its context, and all of them (they
    # hold their slots until the largest step is done) fit the pool: drop the largest steps until they do
    while batches and max_seq_len - len(batches) - 2 < 1:
        batches.pop(0)
    prompt = max(1, min(STAIRCASE_PROMPT, budget // max(batches, default=1), max_seq_len - len(batches) - 2))
    while batches and batches[0] * (prompt + len(batches) + 1) > num_slots // 2:
        batches.pop(0)
    return WarmupPlan(sorted(sizes, reverse=True), batches, prompt, list(FEATURES))


def warm_up(engine: Engine) -> WarmupReport:
    """Runs the warm-up (see the module's docstring) on an engine with no request yet, and cleans up after it."""
    if engine.has_work:
        raise RuntimeError("the warm-up runs before the engine takes requests")
    start = time.perf_counter()
    plan = plan_warmup(engine.config, engine.max_seq_len, engine.scheduler.allocator.num_free)
    requests = _Requests(engine)
    parts = []
    with triton_compiles() as compiled:
        for name, run in (
            ("prefill", lambda: requests.prefill(plan.prefill_tokens)),
            ("decode", lambda: requests.staircase(plan.decode_batches, plan.staircase_prompt, features=False)),
            ("sampling", lambda: requests.staircase(plan.decode_batches, plan.staircase_prompt, features=True)),
        ):
            t, steps = time.perf_counter(), run()
            parts.append(WarmupPart(name, steps, time.perf_counter() - t, compiled[:]))
            log.info(
                "warm-up part done", part=name, steps=steps, seconds=round(parts[-1].seconds, 3), compiled=compiled[:]
            )
            compiled.clear()
    _forget(engine)
    report = WarmupReport(plan, parts, time.perf_counter() - start)
    log.info(
        "warm-up done",
        seconds=round(report.seconds, 3),
        # compiled since the runner started (CUDA-graph capture included): none with a warm kernel cache
        kernels_built=engine.runner.kernels_built(),
        prefill_tokens=plan.prefill_tokens,
        decode_batches=plan.decode_batches,
        triton_compiled=sum(len(p.compiled) for p in parts),
    )
    return report


class _Requests:
    """Adds the warm-up's requests and runs the engine until they are done. Each request's first token is its
    own (a running count), so no two share a prefix in the radix cache and every prompt position is computed."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.vocab = engine.vocab_size
        self.rng = np.random.default_rng(0)
        self.count = 0

    def prompt(self, n: int) -> list[int]:
        ids = self.rng.integers(0, self.vocab, n)
        ids[0] = self.count % self.vocab
        self.count += 1
        return ids.tolist()

    def add(self, n: int, params: SamplingParams) -> None:
        self.engine.add_request(f"warmup-{self.count}", self.prompt(n), params)

    def run(self) -> int:
        """Steps the engine until every warm-up request is done; returns its turns (engine.step calls)."""
        steps = 0
        while self.engine.has_work:
            self.engine.step()
            steps += 1
        if self.engine.scheduler.cache is not None:
            self.engine.scheduler.cache.reset()  # the next part's prompts find nothing cached
        return steps

    def prefill(self, sizes: list[int]) -> int:
        """One prefill step per size: requests whose prompts add up to it (each shorter than the context, at
        most max_bs of them), one token each."""
        steps = 0
        longest = self.engine.max_seq_len - 1
        for n in sizes:
            k = -(-n // longest)
            for i in range(k):
                self.add(n // k + (i < n % k), SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
            steps += self.run()
        return steps

    def staircase(self, batches: list[int], prompt: int, features: bool) -> int:
        """batches[0] requests admitted in one step, then one decode step per entry of `batches`: request i
        decodes while i < batches[j], so step j has exactly batches[j] rows. With `features`, row i carries
        FEATURES[i % len] (and request 0 asks for prompt logprobs too)."""
        if not batches:
            return 0
        names = list(FEATURES)
        for i in range(batches[0]):
            max_tokens = 1 + sum(b > i for b in batches)
            kw: dict = dict(max_tokens=max_tokens, temperature=0.7, ignore_eos=True)
            if features:
                name = names[i % len(names)]
                kw |= FEATURES[name]
                if name == "min_tokens":
                    kw["min_tokens"] = max_tokens
                if i == 0:
                    kw["prompt_logprobs"] = 2
            self.add(prompt, SamplingParams(**kw))
        return self.run()


def _forget(engine: Engine) -> None:
    """Leaves no trace of the warm-up: no request, the prefix cache empty (every slot free), the counters at
    zero, the row table and the sampler's noise as built, on every rank."""
    scheduler = engine.scheduler
    assert not engine.has_work and not engine.seqs, "the warm-up's requests are all done"
    if scheduler.cache is not None:
        scheduler.cache.reset()
        scheduler.cache.query_tokens = scheduler.cache.hit_tokens = 0
    assert scheduler.num_slots_used == 0, "the warm-up gave back every KV slot"
    scheduler.num_preemptions = 0
    scheduler.group = 0  # the micro-batch group the next step serves (pipeline parallel), as built
    engine.num_generated_tokens = engine.num_prompt_tokens_computed = 0
    if engine.workers is not None:
        engine.workers.control("forget_requests")
    engine.runner.forget_requests()


def _triton_runtime_knobs():
    """Triton's runtime knobs where they have the post-compile hook (Triton 3.4 on), else None."""
    try:
        from triton import knobs
    except ImportError:
        return None
    runtime = getattr(knobs, "runtime", None)
    return runtime if hasattr(runtime, "jit_post_compile_hook") else None


def can_watch_compiles() -> bool:
    """Whether `triton_compiles` sees compiles here (Triton installed, with its post-compile hook)."""
    return _triton_runtime_knobs() is not None


@contextmanager
def triton_compiles() -> Iterator[list[str]]:
    """The names of the Triton kernels compiled (or loaded from Triton's disk cache) while inside, through
    Triton's post-compile hook where this Triton has one (can_watch_compiles); an empty list otherwise."""
    names: list[str] = []
    runtime = _triton_runtime_knobs()
    if runtime is None:
        yield names
        return
    previous = runtime.jit_post_compile_hook

    def hook(*args, **kwargs):
        fn = kwargs.get("fn")
        names.append(getattr(fn, "name", "?"))
        return previous(*args, **kwargs) if previous is not None else None

    runtime.jit_post_compile_hook = hook
    try:
        yield names
    finally:
        runtime.jit_post_compile_hook = previous
