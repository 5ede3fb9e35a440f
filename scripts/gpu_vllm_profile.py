"""vLLM's side of the side-by-side profile: nano and batch-1 latency (as the vLLM bundle's nano_offline.py
and latency.py measure them), then vLLM's own torch-profiler tables of 20 decode steps at batch 256 and at
batch 1 with ~900-token contexts, the same steps scripts/bench.py --profile-dir profiles on ringllm.

    source .vllm-run/env.sh && python3 scripts/gpu_vllm_profile.py --model /tmp/qwen3-0.6b --out $OUT

Needs an offline vLLM 0.26 bundle unpacked with its scripts in .vllm-run/ (the team's GPU host kit; not part of
this repository). Writes vllm_profile_bs{N}.txt
(vLLM's per-kernel table, sorted by CUDA time) and prints the nano and latency JSON lines."""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / ".vllm-run"))
import vllm_env  # sets the offline environment before vllm loads
from latency import emit, run_latency
from nano_offline import NANO_FINGERPRINT, nano_workload

PROFILED_STEPS = 20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/qwen3-0.6b")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.config import ProfilerConfig
    from vllm.inputs import TokensPrompt

    trace_dir = Path("/tmp/vllm-profile")
    shutil.rmtree(trace_dir, ignore_errors=True)
    trace_dir.mkdir()
    prof = ProfilerConfig(
        profiler="torch",
        torch_profiler_dir=str(trace_dir),
        torch_profiler_with_stack=False,
        delay_iterations=25,
        max_iterations=PROFILED_STEPS,
        ignore_frontend=True,
    )
    llm = LLM(
        model=a.model,
        max_num_seqs=256,
        max_model_len=4096,
        gpu_memory_utilization=0.9,
        generation_config="vllm",
        seed=0,
        profiler_config=prof,
    )
    prompts, max_tokens = nano_workload()
    assert sum(max_tokens) == NANO_FINGERPRINT
    llm.generate([TokensPrompt(prompt_token_ids=[1] * 16)], SamplingParams(max_tokens=16), use_tqdm=False)
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=m) for m in max_tokens]
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    emit(
        {
            "workload": "nano",
            "engine": "vllm",
            "tok_per_s": tokens / seconds,
            "output_tokens": tokens,
            "seconds": seconds,
            **vllm_env.versions(),
        },
        None,
    )
    emit({**run_latency(llm), "engine": "vllm"}, None)

    rng = random.Random(4)
    for batch in (256, 1):
        batch_prompts = [
            TokensPrompt(prompt_token_ids=[rng.randint(0, 10000) for _ in range(900)]) for _ in range(batch)
        ]
        sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=80)
        llm.start_profile()
        t0 = time.perf_counter()
        llm.generate(batch_prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t0
        llm.stop_profile()
        table = next(trace_dir.glob("profiler_out_*.txt"), None)
        header = (
            f"vLLM batch {batch}: {PROFILED_STEPS} decode steps profiled (engine iterations 25-44 of a "
            f"generate of {batch} x 900-token prompts, 80 tokens; that generate took {wall:.2f} s)\n"
        )
        text = table.read_text() if table else "no profiler table was written\n"
        (a.out / f"vllm_profile_bs{batch}.txt").write_text(header + text)
        if table:
            table.unlink()
        print(header + "\n".join(text.splitlines()[:30]), flush=True)


if __name__ == "__main__":
    main()
