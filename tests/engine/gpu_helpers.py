"""Helpers of the GPU tests (marker `gpu`): attention metadata over random slots, the tiny bf16 checkpoint's
prompts and engine runs, the Qwen3-0.6B-shape runs that compare greedy paths and teacher-forced logprobs,
and the prefix workload's shape for cascade attention."""

import random

import numpy as np
import torch

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.attention import AttentionMetadata
from ringllm.engine.engine import Engine
from tests.helpers import run_engine


def attention_metadata(kv_lens, new_lens, pool_slots, device):
    rng = np.random.default_rng(0)
    qo = np.concatenate([[0], np.cumsum(new_lens)])
    kvp = np.concatenate([[0], np.cumsum(kv_lens)])
    slots = rng.permutation(np.arange(1, pool_slots))[: kvp[-1]].astype(np.int32)
    out = np.concatenate([slots[kvp[i + 1] - n : kvp[i + 1]] for i, n in enumerate(new_lens)])
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.int32)).to(device)
    return AttentionMetadata(
        qo, kvp, np.asarray(kv_lens), all(n == 1 for n in new_lens), t(qo), t(kvp), t(slots), t(out).long()
    )


def rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()


def gpu_prompts():
    rng = random.Random(0)
    shared = [rng.randrange(512) for _ in range(40)]
    return [[rng.randrange(512) for _ in range(n)] for n in (5, 70, 1, 130)] + [shared + [1, 2, 3], shared + [4]]


def generate(gpu_ckpt, **kw):
    engine = Engine(
        EngineConfig(
            model=str(gpu_ckpt), device="cuda", max_bs=16, context_len=512, dtype="bfloat16", kv_cache_tokens=4096, **kw
        )
    )
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    try:
        return run_engine(engine, gpu_prompts(), params, "a"), run_engine(engine, gpu_prompts(), params, "b")
    finally:
        engine.close()


def parallel_prompts():
    rng = random.Random(3)
    return [[rng.randrange(150_000) for _ in range(n)] for n in (7, 300, 1, 45, 129, 64, 2, 511)]


def parallel_engine(path, **kw):
    from tests.helpers import free_port

    return Engine(
        EngineConfig(model=str(path), max_bs=16, context_len=1024, kv_cache_tokens=1 << 15, nccl_port=free_port(), **kw)
    )


def greedy_with_margins(path, **kw):
    """Greedy tokens of 8 prompts with the top-2 logprobs of every step; the engine is closed afterwards."""
    prompts = parallel_prompts()
    engine = parallel_engine(path, **kw)
    try:
        if kw.get("attention_backend") != "torch":  # the torch backend has no graph decoder
            assert engine.runner.graphs is not None  # the decode steps below run the CUDA-graph path
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
        outs = {f"m{i}": [] for i in range(len(prompts))}
        for i, p in enumerate(prompts):
            engine.add_request(f"m{i}", p, params)
        while engine.has_work:
            for o in engine.step():
                outs[o.rid].append((o.token_id, o.top_logprobs))
        return [outs[f"m{i}"] for i in range(len(prompts))]
    finally:
        engine.close()
        del engine
        torch.cuda.empty_cache()


def teacher_forced(path, sequences, **kw):
    """For every position of each sequence: the logprob of the sequence's next token and the top-5 ids, as
    the engine computes them with the sequence given (teacher forcing, through prompt logprobs)."""
    engine = parallel_engine(path, **kw)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=5)
        for i, seq in enumerate(sequences):
            engine.add_request(f"t{i}", seq, params)
        got = {}
        while engine.has_work:
            for o in engine.step():
                if o.prompt_logprobs is not None:
                    got[o.rid] = o.prompt_logprobs
        return [got[f"t{i}"] for i in range(len(sequences))]
    finally:
        engine.close()
        del engine
        torch.cuda.empty_cache()


def greedy_agreement(ref, got) -> tuple[int, list[float]]:
    """Tokens matched before each request's first divergence, and one GPU's top-2 margin at each divergence."""
    matched, margins = 0, []
    for r, g in zip(ref, got):
        for (tok_r, top_r), (tok_g, _) in zip(r, g):
            if tok_r != tok_g:
                margins.append(top_r[0][1] - top_r[1][1])
                break
            matched += 1
    return matched, margins


def teacher_forced_agreement(ref, got) -> tuple[float, int, int]:
    """(relative logprob gap, positions with the same top-1 token, positions) of two teacher-forced runs."""
    ref_lp = [lp for seq in ref for lp, _ in seq]
    got_lp = [lp for seq in got for lp, _ in seq]
    assert len(got_lp) == len(ref_lp)
    same_top = sum(a[0][0] == b[0][0] for sr, sg in zip(ref, got) for (_, a), (_, b) in zip(sr, sg))
    return relative_gap(got_lp, ref_lp), same_top, len(ref_lp)


def relative_gap(got: list[float], ref: list[float]) -> float:
    """|got - ref| over how much ref varies: an absolute tolerance alone would pass anything on the near-flat
    logits of random weights (logit std ~0.64 nats here)."""
    g, r = torch.tensor(got, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return ((g - r).norm() / (r - r.mean()).norm()).item()


def prefix_shape_greedy(path, **kw):
    """The prefix workload scaled down (4 system prompts of 2,048 ids, 32 ids each of their own, 64 requests
    decoding together: a decode step saves 4 x 15 x 2,048 KV reads, well past cascade.MIN_SAVED_TOKENS):
    greedy tokens with top-2 logprobs, how many decode steps ran cascade, and how many of them replayed a
    cascade CUDA graph."""
    rng = random.Random(4)
    systems = [[rng.randrange(150_000) for _ in range(2048)] for _ in range(4)]
    prompts = [systems[i % 4] + [rng.randrange(150_000) for _ in range(32)] for i in range(64)]
    engine = Engine(EngineConfig(model=str(path), max_bs=64, context_len=4096, kv_cache_tokens=1 << 15, **kw))
    inputs = engine.runner.inputs
    cascade_for, cascade_steps = inputs.cascade_for, [0]

    def counting(plan, kv_lens):
        got = cascade_for(plan, kv_lens)
        cascade_steps[0] += got is not None
        return got

    inputs.cascade_for = counting
    graphs, graph_steps = engine.runner.graphs, [0]
    if graphs is not None:
        run = graphs.run

        def counting_graphs(input_ids, positions, meta, *args, **kw):
            graph_steps[0] += meta.cascade is not None  # a cascade step replays its bucket's cascade graph
            return run(input_ids, positions, meta, *args, **kw)

        graphs.run = counting_graphs
    try:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2)
        outs = {f"c{i}": [] for i in range(len(prompts))}
        for i, p in enumerate(prompts):
            engine.add_request(f"c{i}", p, params)
        while engine.has_work:
            for o in engine.step():
                outs[o.rid].append((o.token_id, o.top_logprobs))
        return [outs[f"c{i}"] for i in range(len(prompts))], cascade_steps[0], graph_steps[0]
    finally:
        engine.close()
        del engine
        torch.cuda.empty_cache()
