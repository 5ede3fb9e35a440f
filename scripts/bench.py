"""Offline throughput and latency benchmark of the engine (no HTTP).

    python scripts/bench.py --shape scripts/shapes/qwen3-0.6b.json --workload all --json out.json

Workloads:
  nano     nano-vllm's bench exactly: random.seed(0); 256 prompts of randint(0, 10000) ids with lengths
           randint(100, 1024); max_tokens randint(100, 1024) each; ignore_eos; temperature 0.6; one warm-up
           request first. Fingerprint: 133,966 output tokens.
  latency  batch 1, 128-token prompt, 512 output tokens, greedy: ms per output token and TTFT.
  prefix   256 requests over 8 system prompts of 2,048 tokens plus a 64-token unique suffix, 128 output tokens,
           radix cache on vs off: throughput and prompt tokens computed.
The nano run also prints its roofline floor (one GPU only): KV bytes read plus weight bytes per step over the
measured device copy bandwidth. --tp-size / --pp-size run the same workloads on several GPUs. --deterministic
both runs them in the default mode and then with --enable-deterministic-inference, and prints the mode's cost:

    python scripts/bench.py --shape scripts/shapes/qwen3-0.6b.json --workload nano --deterministic both
    python scripts/bench.py --shape scripts/shapes/qwen3-0.6b.json --workload latency --deterministic both"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import random
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads

from ringllm.engine.config import EngineConfig
from ringllm.engine.engine import Engine
from ringllm.engine.kv_cache import KVPool
from ringllm.engine.sampling_params import SamplingParams

NANO_FINGERPRINT = 133_966


def nano_workload():
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    params = [
        SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=random.randint(100, 1024)) for _ in range(256)
    ]
    return prompts, params


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(engine: Engine, prompts, params, tag: str):
    """Runs requests to completion; returns seconds, output tokens, steps, and each request's first-token time."""
    first: dict[str, float] = {}
    sync()
    t0 = time.perf_counter()
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(f"{tag}{i}", p, sp)
    steps, tokens = 0, 0
    with tqdm(total=len(prompts), desc=f"{tag} requests", unit="req", disable=not sys.stderr.isatty()) as bar:
        while engine.has_work:
            for out in engine.step():
                if out.token_id is not None:
                    tokens += 1
                    first.setdefault(out.rid, time.perf_counter() - t0)
                bar.update(out.finish_reason is not None)
            steps += 1
    sync()
    return time.perf_counter() - t0, tokens, steps, first


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy (median of 10)."""
    if not torch.cuda.is_available():
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() / sorted(times[2:])[len(times[2:]) // 2]


class HostTimer:
    """Wall time spent in the scheduler, in launching steps and in waiting for their tokens (monkeypatched
    around the engine, so the engine itself carries no timing code)."""

    def __init__(self, engine: Engine):
        self.totals = {"schedule": 0.0, "launch": 0.0, "wait": 0.0, "read_back": 0.0}
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.runner, "forward", "launch")  # a step is launched in two phases: forward, then sample
        self._wrap(engine.runner, "sample", "launch")
        self._wrap(engine, "_read_back", "read_back")
        from ringllm.engine.step_result import StepResult

        original, totals = StepResult.wait, self.totals

        def wait(result):
            t = time.perf_counter()
            out = original(result)
            totals["wait"] += time.perf_counter() - t
            return out

        StepResult.wait = wait  # type: ignore[method-assign]

    def _wrap(self, obj, name, key):
        fn, totals = getattr(obj, name), self.totals

        def timed(*args, **kw):
            t = time.perf_counter()
            out = fn(*args, **kw)
            totals[key] += time.perf_counter() - t
            return out

        setattr(obj, name, timed)


KERNEL_KINDS = [  # (kind, substrings of kernel names), first match wins
    ("attention (FlashInfer)", ("BatchDecode", "BatchPrefill", "flashinfer", "Persistent")),
    ("GEMM (cuBLAS/cutlass)", ("gemm", "Gemm", "xmma", "cutlass", "nvjet", "splitK", "gemv")),
    ("q/k norm + rotary (+KV)", ("_norm_rope", "_qkv_rope")),
    ("RMSNorm (+residual)", ("_rmsnorm",)),
    ("SiLU-and-mul", ("_silu",)),
    ("sampling", ("_gumbel", "argmax", "gather", "argMax", "reduce_kernel")),
    ("KV store / indexing", ("index_put", "indexing", "index_elementwise", "scatter")),
    ("copies / fills", ("copy", "Memcpy", "Memset", "fill", "elementwise")),
]


def kernel_table(prof, steps: int) -> str:
    """CUDA time and launches per step, grouped by kind of kernel (from the profiler's per-kernel totals)."""
    from torch.autograd import DeviceType

    kinds: dict[str, list[float]] = {}
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        t = e.self_device_time_total
        kind = next((k for k, subs in KERNEL_KINDS if any(s in e.key for s in subs)), "other")
        acc = kinds.setdefault(kind, [0.0, 0])
        acc[0] += t
        acc[1] += e.count
    total = sum(v[0] for v in kinds.values()) or 1.0
    lines = [f"{'kind':<24} {'us/step':>9} {'share':>6} {'kernels/step':>12}"]
    for kind, (t, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{kind:<24} {t / steps:>9.1f} {t / total:>6.1%} {n / steps:>12.1f}")
    lines.append(f"{'total':<24} {total / steps:>9.1f} {'':>6} {sum(v[1] for v in kinds.values()) / steps:>12.1f}")
    return "\n".join(lines)


def profile_decode(engine: Engine, out_dir: Path, batch: int, steps: int = 20, context: int = 900) -> None:
    """Torch profiler over `steps` decode steps at `batch` sequences with ~`context`-token contexts: where device time
    goes per step, by kind of kernel, plus the per-kernel tables. Also the wall time per step."""
    from torch.profiler import ProfilerActivity, profile

    rng = random.Random(4)
    top = min(10000, engine.vocab_size - 1)
    prompts = [[rng.randint(0, top) for _ in range(context)] for _ in range(batch)]
    for i, p in enumerate(prompts):
        engine.add_request(f"prof{batch}-{i}", p, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=80))
    for _ in range(30):
        engine.step()  # prefill and settle
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync()
    while engine.has_work:
        engine.step()
    summary = f"batch {batch}: {wall * 1e3:.3f} ms per decode step (wall, unprofiled)\n" + kernel_table(prof, steps)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (out_dir / f"profile_decode_bs{batch}.txt").write_text(summary + "\n\n" + table + "\n\nby host time:\n" + cpu_table)
    print(summary, flush=True)


def nano(engine: Engine, bandwidth: float) -> dict:
    prompts, params = nano_workload()
    expected = sum(p.max_tokens for p in params)
    assert expected == NANO_FINGERPRINT, f"workload fingerprint {expected} != {NANO_FINGERPRINT}"
    run(engine, [[1] * 16], [SamplingParams(max_tokens=16)], "warm")
    engine.scheduler.cache and engine.scheduler.cache.reset()  # a repeated run starts as cold as the first
    timer = HostTimer(engine)
    seconds, tokens, steps, _ = run(engine, prompts, params, "nano")
    print("host time (s):", {k: round(v, 3) for k, v in timer.totals.items()})
    shape = engine.runner.shape
    # The cache's own element size: an fp8 cache's floor reads half the KV bytes of a bf16 one.
    per_token = KVPool.bytes_per_token(shape.num_layers, shape.num_kv_heads, shape.head_dim, engine.runner.kv_dtype)
    kv_tokens = sum(o * len(p) + o * (o - 1) // 2 for p, o in ((p, sp.max_tokens) for p, sp in zip(prompts, params)))
    weight_bytes = sum(t.numel() * t.element_size() for t in engine.runner.model.parameters())
    floor_bytes = kv_tokens * per_token + weight_bytes * steps
    floor = floor_bytes / bandwidth
    return {
        "workload": "nano",
        "seconds": seconds,
        "output_tokens": tokens,
        "tok_per_s": tokens / seconds,
        "steps": steps,
        "kv_bytes_read": kv_tokens * per_token,
        "weight_bytes_per_step": weight_bytes,
        "copy_bandwidth_Bps": bandwidth,
        "floor_seconds": floor,
        "floor_tok_per_s": tokens / floor,
        "ratio_to_floor": floor / seconds,
        "host_seconds": dict(timer.totals),  # a copy: a later run's timer wraps this one's wrappers
    }


def latency(engine: Engine) -> dict:
    rng = random.Random(1)
    prompt = [rng.randint(0, 10000) for _ in range(128)]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=512)
    run(engine, [prompt], [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=32)], "lwarm")
    timer = HostTimer(engine)
    seconds, tokens, steps, first = run(engine, [prompt], [params], "lat")
    ttft = first["lat0"]
    return {
        "workload": "latency",
        "seconds": seconds,
        "output_tokens": tokens,
        "ttft_ms": ttft * 1e3,
        "ms_per_output_token": (seconds - ttft) / (tokens - 1) * 1e3,
        # host time per step in the runner's forward and sample (prepare, graph replay, sampling: queued, no sync)
        # and in the scheduler; a decode step is host-bound when their sum nears ms_per_output_token
        "launch_ms_per_step": timer.totals["launch"] / steps * 1e3,
        "schedule_ms_per_step": timer.totals["schedule"] / steps * 1e3,
        # reading a step's tokens back, and of it the wait for the device: a wait near 0 means host-bound
        "read_back_ms_per_step": timer.totals["read_back"] / steps * 1e3,
        "wait_ms_per_step": timer.totals["wait"] / steps * 1e3,
    }


def prefix_workload():
    prompts = workloads.prefix_prompts()
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=workloads.PREFIX_MAX_TOKENS)
    return prompts, [params] * len(prompts)


def prefix(engine: Engine) -> dict:
    prompts, params = prefix_workload()
    engine.scheduler.cache and engine.scheduler.cache.reset()
    before = engine.stats()["prompt_tokens_computed"]
    inputs = engine.runner.inputs
    cascade_for, cascade_steps = inputs.cascade_for, [0]

    def counting(plan, kv_lens):  # how many steps ran cascade attention
        got = cascade_for(plan, kv_lens)
        cascade_steps[0] += got is not None
        return got

    inputs.cascade_for = counting
    try:
        seconds, tokens, steps, _ = run(engine, prompts, params, "pfx")
    finally:
        inputs.cascade_for = cascade_for
    computed = engine.stats()["prompt_tokens_computed"] - before
    unique = workloads.PREFIX_SYSTEMS * workloads.PREFIX_SYSTEM_LEN + len(prompts) * workloads.PREFIX_SUFFIX_LEN
    return {
        "workload": "prefix",
        "radix": engine.scheduler.cache is not None,
        "cascade": engine.scheduler.group_shared_prefixes and engine.runner.attn.supports_cascade,
        "steps": steps,
        "cascade_steps": cascade_steps[0],
        "seconds": seconds,
        "output_tokens": tokens,
        "tok_per_s": tokens / seconds,
        "prompt_tokens_computed": computed,
        "unique_prompt_tokens": unique,
        "computed_over_unique": computed / unique,
    }


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: where a stuck run is
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory")
    ap.add_argument("--shape", type=Path, help="config.json of a real model: build a random checkpoint of it")
    ap.add_argument("--workload", default="all", choices=["nano", "latency", "prefix", "all"])
    ap.add_argument("--max-bs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--context-len", type=int, default=4096)
    ap.add_argument("--disable-overlap-schedule", action="store_true")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--pp-size", type=int, default=1)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"], help="fp8: e4m3 K/V")
    ap.add_argument("--warmup", default="auto", choices=["auto", "on", "off"], help="the engine's start-up warm-up")
    ap.add_argument("--json", type=Path, help="write results here")
    ap.add_argument("--profile-dir", type=Path, help="also profile 20 decode steps and write the tables here")
    ap.add_argument("--repeat", type=int, default=1, help="run nano and latency this many times (one engine)")
    ap.add_argument("--profile-batch", type=int, nargs="+", default=[256], help="batch sizes to profile")
    ap.add_argument(
        "--deterministic",
        default="off",
        choices=["off", "on", "both"],
        help="--enable-deterministic-inference: off, on, or both (each workload in the default mode, then in "
        "deterministic mode on a fresh engine, and the cost of the mode)",
    )
    a = ap.parse_args()
    model = a.model
    if model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from make_checkpoint import build

        out = Path("/tmp/ringllm-bench") / a.shape.stem
        if not (out / "model.safetensors").is_file():
            build(a.shape, out, device="cuda" if torch.cuda.is_available() else "cpu")
        model = str(out)
    base = dict(
        model=model,
        max_bs=a.max_bs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        context_len=a.context_len,
        disable_overlap_schedule=a.disable_overlap_schedule,
        enforce_eager=a.enforce_eager,
        attention_backend=a.attention_backend,
        kv_cache_dtype=a.kv_cache_dtype,
        tp_size=a.tp_size,
        pp_size=a.pp_size,
        warmup=a.warmup,
    )
    results = Results(a.json, {k: v for k, v in base.items() if k != "model"} | {"model": Path(model).name})
    todo = ["nano", "latency", "prefix"] if a.workload == "all" else [a.workload]
    bandwidth = copy_bandwidth() if a.tp_size * a.pp_size == 1 else float("nan")
    for deterministic in {"off": [False], "on": [True], "both": [False, True]}[a.deterministic]:
        measure(dict(base, enable_deterministic_inference=deterministic), todo, a, bandwidth, results)
    results.table()
    if a.deterministic == "both":
        results.deterministic_cost()


def measure(base: dict, todo: list[str], a: argparse.Namespace, bandwidth: float, results: Results) -> None:
    """The workloads of `todo` on one engine (the prefix workload also with cascade off and the cache off)."""
    deterministic = base["enable_deterministic_inference"]
    tag = dict(deterministic=True) if deterministic else {}
    started = time.perf_counter()
    engine = Engine(EngineConfig(**base))
    warmup = engine.warmup.seconds if engine.warmup is not None else 0.0
    print(f"start-up: {time.perf_counter() - started:.2f} s from Engine() to ready, warm-up {warmup:.2f} s", flush=True)
    for _ in range(a.repeat):
        if "nano" in todo:
            results.append(nano(engine, bandwidth) | tag)
        if "latency" in todo:
            results.append(latency(engine) | tag)
    if a.profile_dir:
        a.profile_dir.mkdir(parents=True, exist_ok=True)
        for batch in a.profile_batch:
            profile_decode(engine, a.profile_dir, batch)
    if "prefix" in todo:
        results.append(prefix(engine) | tag)
        # then the radix cache without cascade attention (deterministic mode runs none), and no radix cache
        for off in ([] if deterministic else [dict(disable_cascade_attention=True)]) + [dict(disable_radix_cache=True)]:
            engine.close()
            del engine
            _free_gpu_memory()
            engine = Engine(EngineConfig(**base, **off))
            results.append(prefix(engine) | tag)
    engine.close()
    del engine
    _free_gpu_memory()


def _free_gpu_memory() -> None:
    """Gives a closed engine's GPU memory back before the next one is built (`--deterministic both`, the prefix
    workload's variants): the timers' wrappers form cycles with the engine, so only a collection frees it."""
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


class Results:
    """Each result is printed and written to the JSON file as soon as it is measured, so a run that fails
    later keeps what it measured; the table of all of them comes last."""

    def __init__(self, path: Path | None, config: dict):
        self.path, self.config, self.rows = path, config, []
        print(f"config: {json.dumps(config)}")

    def append(self, r: dict) -> None:
        self.rows.append(r)
        print(self._line(r), flush=True)
        if self.path:
            self.path.write_text(json.dumps({"config": self.config, "results": self.rows}, indent=2))

    @staticmethod
    def _line(r: dict) -> str:
        detail = {
            k: (round(v, 3) if isinstance(v, float) else v)
            for k, v in r.items()
            if k not in ("workload", "seconds", "output_tokens", "tok_per_s")
        }
        return (
            f"{r['workload']:<10} {r['seconds']:>8.2f} {r['output_tokens']:>8} {r.get('tok_per_s', 0):>9.0f}  {detail}"
        )

    def table(self) -> None:
        print(f"\n{'workload':<10} {'seconds':>8} {'out tok':>8} {'tok/s':>9}  details")
        for r in self.rows:
            print(self._line(r))

    def deterministic_cost(self) -> None:
        """The deterministic mode against the default, per workload: its main measure, the best run of each mode
        (--repeat), and the slowdown. prefix: the first run of each (radix cache on; cascade on by default)."""
        print("\ndeterministic mode's cost")
        for workload, key in (("nano", "seconds"), ("latency", "ms_per_output_token"), ("prefix", "seconds")):
            rows = [r for r in self.rows if r["workload"] == workload]
            pick = (lambda xs: xs[0]) if workload == "prefix" else min
            default = [r[key] for r in rows if not r.get("deterministic")]
            det = [r[key] for r in rows if r.get("deterministic")]
            if default and det:
                a, b = pick(default), pick(det)
                print(f"{workload:<10} {key}: {a:.3f} -> {b:.3f} ({b / a - 1:+.1%})")


if __name__ == "__main__":
    main()
