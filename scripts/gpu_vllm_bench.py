"""vLLM's side of the side-by-side prefix benchmark: scripts/bench.py's `prefix` workload (the same 256
token-id prompts over 8 shared 2,048-token system prompts, greedy, 128 tokens each), timed as one
llm.generate after a warm-up, with vLLM's prefix caching on or off.

    source .vllm-run/env.sh && python3 scripts/gpu_vllm_bench.py --model /tmp/qwen3-0.6b [--no-prefix-caching]

Needs the team's offline vLLM 0.26 bundle unpacked with its scripts in .vllm-run/ (not part of this
repository). Prints one JSON line (and appends it to --json)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / ".vllm-run"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_env  # sets the offline environment before vllm loads
import workloads
from latency import add_engine_args, emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    ap.add_argument("--no-prefix-caching", action="store_true", help="enable_prefix_caching=False")
    a = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    caching = not a.no_prefix_caching
    llm = LLM(
        model=a.model,
        max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len,
        gpu_memory_utilization=a.gpu_memory_utilization,
        generation_config="vllm",
        seed=0,
        enable_prefix_caching=caching,
    )
    llm.generate([TokensPrompt(prompt_token_ids=[1] * 16)], SamplingParams(max_tokens=16), use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workloads.prefix_prompts()]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=workloads.PREFIX_MAX_TOKENS)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    emit(
        {
            "workload": "prefix",
            "engine": "vllm",
            "prefix_caching": caching,
            "seconds": seconds,
            "output_tokens": tokens,
            "tok_per_s": tokens / seconds,
            **vllm_env.versions(),
        },
        a.json,
    )


if __name__ == "__main__":
    main()
