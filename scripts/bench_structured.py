"""The cost of structured outputs on the engine (no HTTP): scripts/bench.py's nano workload with a share of
its requests constrained by a JSON schema, against the same workload unconstrained.

    python scripts/bench_structured.py --shape scripts/shapes/qwen3-0.6b.json --constrained-fraction 0.1

The constraint is a JSON array of strings with more items than any request can write, so a constrained
request never completes its grammar early: every request writes its max_tokens, the token count equals the
unconstrained run's (nano's fingerprint, 133,966), and the difference in time is the grammar's alone (mask
fills, the mask copy, and the step whose sampling waits for the previous step's tokens). --model or --shape
as in scripts/bench.py."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import NANO_FINGERPRINT, nano_workload, run

from ringllm.engine.config import EngineConfig
from ringllm.engine.engine import Engine
from ringllm.engine.sampling_params import SamplingParams, StructuredOutputs

# A grammar that stays open: strings, commas and whitespace for as long as max_tokens allows.
NEVER_COMPLETE = StructuredOutputs(json={"type": "array", "items": {"type": "string"}, "minItems": 1_000_000})


def constrained(params: list[SamplingParams], fraction: float) -> tuple[list[SamplingParams], int]:
    """The same parameters with every k-th request constrained (k = 1 / fraction, 0: none)."""
    if fraction <= 0:
        return params, 0
    every = max(1, round(1 / fraction))
    out = [
        SamplingParams(**{**_fields(p), "structured_outputs": NEVER_COMPLETE}) if i % every == 0 else p
        for i, p in enumerate(params)
    ]
    return out, sum(1 for i in range(len(params)) if i % every == 0)


def _fields(p: SamplingParams) -> dict:
    return {name: getattr(p, name) for name in p.__struct_fields__}


def build_engine(a: argparse.Namespace) -> Engine:
    model = a.model
    if model is None:  # a random checkpoint of a real model's shape, as scripts/bench.py builds it
        import torch
        from make_checkpoint import build

        out = Path("/tmp/ringllm-bench") / a.shape.stem
        if not (out / "model.safetensors").is_file():
            build(a.shape, out, device="cuda" if torch.cuda.is_available() else "cpu")
        model = str(out)
    tokenizer = a.tokenizer
    if tokenizer is None and not (Path(model) / "tokenizer.json").is_file():
        from ringllm.engine.demo import demo_model_path

        tokenizer = str(demo_model_path())
        print(
            f"{model} has no tokenizer: the grammars use the demo model's ({tokenizer}); its 1,024 tokens "
            "make mask fills cheaper than a real vocabulary's (pass --tokenizer for a real one)"
        )
    return Engine(
        EngineConfig(
            model=model,
            tokenizer=tokenizer,
            max_bs=a.max_bs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            context_len=a.context_len,
            disable_overlap_schedule=a.disable_overlap_schedule,
            enforce_eager=a.enforce_eager,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (it needs its tokenizer)")
    parser.add_argument("--shape", type=Path, help="config.json of a real model: build a random checkpoint of it")
    parser.add_argument("--tokenizer", help="tokenizer directory for the grammars (default: the model's)")
    parser.add_argument("--constrained-fraction", type=float, default=0.1)
    parser.add_argument("--requests", type=int, default=256, help="the first N of nano's 256 requests")
    parser.add_argument("--max-bs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--context-len", type=int, default=4096)
    parser.add_argument("--disable-overlap-schedule", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    engine = build_engine(args)
    try:
        prompts, params = (x[: args.requests] for x in nano_workload())
        prompts = [[t % engine.vocab_size for t in p] for p in prompts]  # unchanged on real vocabularies
        run(engine, [[1] * 16], [SamplingParams(max_tokens=16, structured_outputs=NEVER_COMPLETE)], "warm")
        results = {}
        for fraction in (0.0, args.constrained_fraction):
            batch, n = constrained(params, fraction)
            seconds, tokens, steps, _ = run(engine, prompts, batch, f"f{fraction}-")
            results[fraction] = {
                "constrained_requests": n,
                "seconds": round(seconds, 3),
                "tokens": tokens,
                "steps": steps,
                "tokens_per_s": round(tokens / seconds, 1),
                "ms_per_step": round(1e3 * seconds / steps, 3),
            }
            print(
                f"constrained {fraction:.0%} ({n} requests): {tokens} tokens in {seconds:.2f} s, "
                f"{tokens / seconds:,.0f} tok/s, {1e3 * seconds / steps:.2f} ms/step"
                + (
                    ""
                    if tokens == NANO_FINGERPRINT or args.requests != 256
                    else f" (nano's fingerprint is {NANO_FINGERPRINT})"
                )
            )
        base, with_grammar = results[0.0], results[args.constrained_fraction]
        print(
            f"structured outputs cost: {100 * (1 - with_grammar['tokens_per_s'] / base['tokens_per_s']):.1f} % "
            f"of throughput"
        )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
