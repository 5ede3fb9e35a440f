"""Checks and times the decode-step kernels of engine/kernels/ against what they replace, on one GPU.

    source .gpu/setup.sh && python3 scripts/gpu_kernels_bench.py [--shape scripts/shapes/qwen3-0.6b.json]

1. correctness (bf16, fresh random inputs): the fused q|k|v norm + rotary + KV store against norm_rope plus
   two cache scatters; the skinny GEMM against F.linear at M = 1..16;
2. time per decode step of the model's linears (28 layers x 4, distinct weights so nothing stays in L2)
   through cuBLAS and through the skinny kernel for several tile choices, replayed from CUDA graphs;
3. time per step of the q/k/v path (fused against unfused), and of the sampler at batch 1 and 256.
Prints tables; every number is a median of graph replays (device events)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringllm.engine.kernels import layers as layer_kernels
from ringllm.engine.kernels import sampling as sampling_kernels


def graph_time(fn, reps: int = 20) -> float:
    """Median microseconds of one replay of a CUDA graph of fn()."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times[3:])[reps // 2]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check(cfg) -> None:
    dev, dt = "cuda", torch.bfloat16
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 128)
    T, slots_n = 37, 4096
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=dev, dtype=dt)
    qw, kw = (torch.randn(D, device=dev, dtype=dt) * 0.1 + 1 for _ in "qk")
    pos = torch.randint(0, 4000, (T,), device=dev)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    fr = torch.outer(torch.arange(4097, device=dev).float(), inv)
    cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()
    slots = torch.randperm(slots_n - 1, device=dev)[:T] + 1
    kc, vc = (torch.full((slots_n, Hkv, D), float("nan"), device=dev, dtype=dt) for _ in "kv")
    q = layer_kernels.qkv_rope_store(qkv, H, Hkv, D, qw, kw, 1e-6, cos, sin, pos, slots, kc, vc)
    q_ref, k_ref, v_ref = qkv.split([H * D, Hkv * D, Hkv * D], -1)
    q_ref = layer_kernels.norm_rope(q_ref.view(T, H, D), qw, 1e-6, cos, sin, pos)
    k_ref = layer_kernels.norm_rope(k_ref.view(T, Hkv, D), kw, 1e-6, cos, sin, pos)
    untouched = torch.ones(slots_n, dtype=torch.bool, device=dev)
    untouched[slots] = False
    untouched_ok = bool(kc[untouched].isnan().all() and vc[untouched].isnan().all())
    print(
        f"fused qkv store: q err {rel(q, q_ref):.2e}, k err {rel(kc[slots], k_ref):.2e}, "
        f"v equal {torch.equal(vc[slots], v_ref.view(T, Hkv, D))}, other slots untouched {untouched_ok}"
    )
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    for M in (1, 3, 8, 16):
        errs = []
        for N, K in (
            (H * D + 2 * Hkv * D, hidden),
            (hidden, H * D),
            (2 * inter, hidden),
            (hidden, inter),
            (vocab, hidden),
        ):
            x, w = torch.randn(M, K, device=dev, dtype=dt), torch.randn(N, K, device=dev, dtype=dt) * 0.05
            y = layer_kernels.linear(x, w, config=(16, 512, 4, 3))
            errs.append(rel(y, x.double() @ w.double().T) if not y.isnan().any() else float("nan"))
        print(
            f"skinny GEMM M={M}: rel err vs float64 "
            + " ".join(f"{e:.1e}" for e in errs)
            + f" (cuBLAS bf16 at M={M}: {rel(F.linear(x, w), x.double() @ w.double().T):.1e})"
        )


def time_linears(cfg, layers: int) -> dict:
    dev, dt = "cuda", torch.bfloat16
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 128)
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {
        "qkv": (H * D + 2 * Hkv * D, hidden),
        "o": (hidden, H * D),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }
    configs = [(16, 128, 4, 4), (16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 4, 3)]
    results = {}
    print(f"\nlinears, us per decode step ({layers} layers, graph replay)")
    print(
        f"{'shape':<8} {'M':>3} {'cuBLAS':>8} {'skinny best':>11}  best config (BLOCK_N, BLOCK_K, warps, stages)"
        f"   default-config"
    )
    for name, (N, K) in list(shapes.items()) + [("lm_head", (vocab, hidden))]:
        n_layers = 1 if name == "lm_head" else layers
        ws = [torch.randn(N, K, device=dev, dtype=dt) * 0.02 for _ in range(n_layers)]
        for M in (1, 4, 16):
            x = torch.randn(M, K, device=dev, dtype=dt)
            t_cublas = graph_time(lambda x=x, ws=ws: [F.linear(x, w) for w in ws])
            best = (float("inf"), None)
            for c in configs:
                t = graph_time(lambda x=x, ws=ws, c=c: [layer_kernels.linear(x, w, config=c) for w in ws])
                best = min(best, (t, c))
            t_default = graph_time(lambda x=x, ws=ws: [layer_kernels.linear(x, w) for w in ws])
            results[f"{name}/M{M}"] = {
                "cublas_us": t_cublas,
                "skinny_best_us": best[0],
                "best": best[1],
                "skinny_default_us": t_default,
            }
            print(f"{name:<8} {M:>3} {t_cublas:>8.1f} {best[0]:>11.1f}  {best[1]}   {t_default:.1f}", flush=True)
        del ws
    return results


def time_qkv_and_sampler(cfg, layers: int) -> None:
    dev, dt = "cuda", torch.bfloat16
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg.get("head_dim", 128)
    inv = 1.0 / (1e6 ** (torch.arange(0, D, 2, device=dev).float() / D))
    fr = torch.outer(torch.arange(4097, device=dev).float(), inv)
    cos, sin = torch.cat([fr, fr], -1).cos(), torch.cat([fr, fr], -1).sin()
    qw, kw = (torch.randn(D, device=dev, dtype=dt) for _ in "qk")
    caches = [
        (torch.zeros(300_000, Hkv, D, device=dev, dtype=dt), torch.zeros(300_000, Hkv, D, device=dev, dtype=dt))
        for _ in range(layers)
    ]
    print(f"\nq/k/v path, us per decode step ({layers} layers)")
    for T in (1, 256):
        qkv = torch.randn(T, (H + 2 * Hkv) * D, device=dev, dtype=dt)
        pos = torch.randint(0, 4000, (T,), device=dev)
        slots = torch.randperm(299_999, device=dev)[:T] + 1

        def unfused(qkv=qkv, T=T, pos=pos, slots=slots):
            for kc, vc in caches:
                q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], -1)
                layer_kernels.norm_rope(q.view(T, H, D), qw, 1e-6, cos, sin, pos)
                k = layer_kernels.norm_rope(k.view(T, Hkv, D), kw, 1e-6, cos, sin, pos)
                kc[slots] = k
                vc[slots] = v.view(T, Hkv, D)

        def fused(qkv=qkv, pos=pos, slots=slots):
            for kc, vc in caches:
                layer_kernels.qkv_rope_store(qkv, H, Hkv, D, qw, kw, 1e-6, cos, sin, pos, slots, kc, vc)

        print(f"T={T:<4} unfused {graph_time(unfused):8.1f}  fused {graph_time(fused):8.1f}", flush=True)
    vocab = cfg["vocab_size"]
    print("\nsampler (kernels.sampling.gumbel_sample), us per call")
    for B in (1, 256):
        logits = torch.randn(B, vocab, device=dev, dtype=dt)
        seed = torch.arange(B, device=dev)
        counter = torch.zeros(B, dtype=torch.long, device=dev)
        for t in (0.0, 0.6):
            temp = torch.full((B,), t, device=dev)
            us = graph_time(
                lambda logits=logits, temp=temp, seed=seed, counter=counter: sampling_kernels.gumbel_sample(
                    logits, temp, seed, counter
                )
            )
            print(f"B={B:<4} T={t}: {us:8.1f} us ({B * vocab * 2 / us / 1e6:.2f} TB/s of logits)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=Path, default=Path("scripts/shapes/qwen3-0.6b.json"))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cfg = json.loads(a.shape.read_text())
    torch.manual_seed(0)
    print("device:", torch.cuda.get_device_name())
    check(cfg)
    layers = cfg["num_hidden_layers"]
    lin = time_linears(cfg, layers)
    time_qkv_and_sampler(cfg, layers)
    if a.json:
        a.json.write_text(json.dumps(lin, indent=1))


if __name__ == "__main__":
    main()
