"""Where the nano workload's time goes, step by step, against its memory-traffic floor (issue: throughput).

    python scripts/nano_account.py --shape scripts/shapes/qwen3-0.6b.json --json out.json

One engine runs nano (scripts/bench.py's workload) three times after one warm-up request: twice as bench.py does
(the first run in the process and a second, to see what is cold), then once with the device synchronized after
every step, so that each step's wall time includes its device time. Each step is classed by what it computed:
  mixed         some prompt positions (prefill chunks, with or without decodes)
  decode-full   only decodes, at least --full rows
  decode-tail   only decodes, fewer rows (the end of the run, few long sequences)
and for each class it prints steps, seconds, tokens out, and the floor: the bytes the step must read (weights
once, every row's K/V once) over the measured copy bandwidth, plus its matrix FLOPs over --flops. The ratio
floor / seconds says how close each class runs to what the hardware allows; cold minus warm per class says where
the first run loses its time.

It ends with two lines: the start-up (Engine() to ready, the warm-up's share, what was compiled) and the first
run against the second (the target: within 5 %). --warmup off measures an engine without the start-up warm-up;
run it with a fresh $RINGLLM_CACHE to see a cold kernel cache, then again with the same one to see a warm one."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import copy_bandwidth, nano_workload, sync

from ringllm.engine.config import EngineConfig
from ringllm.engine.engine import Engine
from ringllm.engine.kv_cache import KVPool
from ringllm.engine.sampling_params import SamplingParams


class CompileCounter:
    """How many Triton kernels were compiled (or loaded from Triton's disk cache) and the seconds it took, since
    the last take(): a first run that compiles is cold."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        try:
            import triton.compiler
            import triton.compiler.compiler as compiler
        except ImportError:
            return
        original, counter = compiler.compile, self

        def counted(*args, **kw):
            t = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                counter.count += 1
                counter.seconds += time.perf_counter() - t

        compiler.compile = triton.compiler.compile = counted  # JITFunction imports it from triton.compiler

    def take(self) -> dict:
        out = dict(count=self.count, seconds=self.seconds)
        self.count, self.seconds = 0, 0.0
        return out


compile_counter = CompileCounter()


class StepLog:
    """Records, for every step the engine launches, its class and its floor inputs; `close()` ends a step."""

    def __init__(self, engine: Engine, full: int):
        self.full, self.rows = full, []
        schedule = engine.scheduler.schedule

        def recorded():
            batch = schedule()
            if batch:
                plan = batch.plan
                kv = plan.starts.astype(np.int64) + plan.lens
                prefill = int(plan.lens.sum()) - plan.num_decodes
                kind = "mixed" if prefill else ("decode-full" if len(plan.rows) >= full else "decode-tail")
                self.rows.append([kind, int(plan.lens.sum()), int(kv.sum()), int(plan.sample.sum()), 0.0])
            return batch

        engine.scheduler.schedule = recorded


def run(engine: Engine, log: StepLog, synced: bool, tag: str, requests: int) -> float:
    prompts, params = (x[:requests] for x in nano_workload())
    engine.scheduler.cache and engine.scheduler.cache.reset()
    start_rows = len(log.rows)
    sync()
    t0 = time.perf_counter()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"{tag}{i}", p, sp)
    while engine.has_work:
        t = time.perf_counter()
        n = len(log.rows)
        engine.step()
        if synced:
            sync()
        if len(log.rows) > n:  # a step was launched: its wall time (with the device's, when synced)
            log.rows[-1][4] = time.perf_counter() - t
    sync()
    seconds = time.perf_counter() - t0
    del log.rows[:start_rows]
    return seconds


def account(rows: list, per_token: int, weight_bytes: int, params: int, bandwidth: float, flops: float) -> dict:
    out: dict = defaultdict(lambda: dict(steps=0, seconds=0.0, tokens_out=0, floor_seconds=0.0, computed=0))
    for kind, computed, kv, sampled, seconds in rows:
        floor = max((weight_bytes + kv * per_token) / bandwidth, 2 * params * computed / flops)
        a = out[kind]
        a["steps"] += 1
        a["seconds"] += seconds
        a["tokens_out"] += sampled
        a["floor_seconds"] += floor
        a["computed"] += computed
    for a in out.values():
        a["floor_over_seconds"] = a["floor_seconds"] / a["seconds"] if a["seconds"] else float("nan")
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--shape", type=Path)
    ap.add_argument("--full", type=int, default=128, help="decode steps with at least this many rows are 'full'")
    ap.add_argument("--flops", type=float, default=790e12, help="bf16 matrix FLOP/s (H200, measured)")
    ap.add_argument("--requests", type=int, default=256, help="the first N of nano's requests (a smoke test)")
    ap.add_argument("--context-len", type=int, default=4096)
    ap.add_argument("--warmup", default="auto", choices=["auto", "on", "off"], help="the engine's start-up warm-up")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    model = a.model
    if model is None:
        from make_checkpoint import build

        out = Path("/tmp/ringllm-bench") / a.shape.stem
        if not (out / "model.safetensors").is_file():
            build(a.shape, out, device="cuda" if torch.cuda.is_available() else "cpu")
        model = str(out)
    config = EngineConfig(
        model=model, max_bs=256, max_num_batched_tokens=16384, context_len=a.context_len, warmup=a.warmup
    )
    compile_counter.take()
    t0 = time.perf_counter()
    engine = Engine(config)
    startup = start_up_line(engine, time.perf_counter() - t0, compile_counter.take())
    bandwidth = copy_bandwidth()
    shape = engine.runner.shape
    kv_dtype = engine.runner.kv_dtype  # the cache's own element size: fp8 reads half the bytes of bf16
    per_token = KVPool.bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim, kv_dtype)
    weights = list(engine.runner.model.parameters())
    weight_bytes = sum(t.numel() * t.element_size() for t in weights)
    params = sum(t.numel() for t in weights) - shape.vocab_size * shape.hidden_size  # the embedding is a lookup
    log = StepLog(engine, a.full)
    warm = [[1] * 16]
    for i, p in enumerate(warm):
        engine.add_request(f"warm{i}", p, SamplingParams(max_tokens=16))
    while engine.has_work:
        engine.step()
    log.rows.clear()
    results = {}
    for tag, synced in (("first", False), ("second", False), ("synced", True)):
        seconds = run(engine, log, synced, tag, a.requests)
        results[tag] = dict(
            seconds=seconds,
            classes=account(log.rows, per_token, weight_bytes, params, bandwidth, a.flops),
            slowest=sorted(log.rows, key=lambda r: -r[4])[:40],  # [kind, computed, kv, sampled, seconds]
            compiles=compile_counter.take(),
        )
        log.rows.clear()
        out_tokens = sum(c["tokens_out"] for c in results[tag]["classes"].values())
        print(f"\n{tag}: {seconds:.3f} s, {out_tokens} tokens ({out_tokens / seconds:,.0f} tok/s)")
        print("triton compiles:", results[tag]["compiles"], "slowest steps:", results[tag]["slowest"][:6])
        print(f"{'class':<12} {'steps':>6} {'seconds':>8} {'tok out':>8} {'floor s':>8} {'floor/s':>8}")
        for kind, c in sorted(results[tag]["classes"].items()):
            print(
                f"{kind:<12} {c['steps']:>6} {c['seconds']:>8.3f} {c['tokens_out']:>8} "
                f"{c['floor_seconds']:>8.3f} {c['floor_over_seconds']:>8.2f}"
            )
    engine.close()
    cold = first_against_second(results["first"]["seconds"], results["second"]["seconds"])
    print(startup["line"])
    print(cold["line"])
    if a.json:
        out = dict(bandwidth=bandwidth, weight_bytes=weight_bytes, runs=results, startup=startup, cold=cold)
        a.json.write_text(json.dumps(out, indent=2))


COLD_TOLERANCE = 0.05  # the target: the first run in a process within 5 % of the second


def start_up_line(engine: Engine, seconds: float, compiles: dict) -> dict:
    """Engine start to ready, the warm-up's share, and what was compiled on the way (Triton kernels compiled or
    loaded from its disk cache in this process; kernels new in the on-disk caches: compiled, not loaded)."""
    warmup = engine.warmup.seconds if engine.warmup is not None else 0.0
    built = engine.runner.kernels_built()
    line = (
        f"start-up: {seconds:.2f} s from Engine() to ready, warm-up {warmup:.2f} s "
        f"({engine.config.warmup}); Triton kernels compiled or loaded: {compiles['count']} "
        f"({compiles['seconds']:.2f} s); new in the kernel caches (compiled, not loaded): {len(built)}"
    )
    return dict(seconds=seconds, warmup_seconds=warmup, triton=compiles, kernels_built=built, line=line)


def first_against_second(first: float, second: float) -> dict:
    """The first nano run against the second, in the same process: how much colder the first is."""
    excess = first / second - 1
    verdict = "within" if excess <= COLD_TOLERANCE else "NOT within"
    line = f"first run {first:.3f} s, second {second:.3f} s: {excess:+.1%} ({verdict} {COLD_TOLERANCE:.0%})"
    return dict(first=first, second=second, excess=excess, within=excess <= COLD_TOLERANCE, line=line)


if __name__ == "__main__":
    main()
