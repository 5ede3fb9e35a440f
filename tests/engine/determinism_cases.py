"""The workload of the determinism tests (CPU: test_determinism.py, GPU: test_determinism_gpu.py): 64 requests,
some sharing prefixes and some continuing another request's prompt and output, run alone and then mixed into
batches of other sizes and orders, chunked, with and without radix-cache hits, preempted; and the comparison,
token by token and logprob by logprob (bit for bit: on the tiny random models a batch-dependent rounding
rarely flips a greedy token, but it always shows in the logprobs)."""

from __future__ import annotations

import random
from collections.abc import Callable

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.engine import Engine

NUM_BASE = 48  # plus 16 continuations: 64 requests
MAX_TOKENS = 8
Output = list[tuple[int, float | None]]  # (token, its logprob) per step


def base_prompts(vocab: int, seed: int = 26) -> list[list[int]]:
    """32 prompts behind 6 shared prefixes (24-40 ids) and 16 of their own (1-48 ids)."""
    rng = random.Random(seed)
    shared = [[rng.randrange(vocab) for _ in range(rng.randint(24, 40))] for _ in range(6)]
    grouped = [shared[i % 6] + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for i in range(32)]
    own = [[rng.randrange(vocab) for _ in range(rng.randint(1, 48))] for _ in range(NUM_BASE - 32)]
    return grouped + own


def continuations(prompts: list[list[int]], outputs: list[Output], vocab: int) -> list[list[int]]:
    """16 prompts that continue a base request's prompt and part of its output with a new id: after that
    request ran, the radix cache holds positions its decode steps computed, which these prefill."""
    rng = random.Random(27)
    picks = rng.sample(range(NUM_BASE), 16)
    return [
        prompts[i] + [t for t, _ in outputs[i][: rng.randint(1, MAX_TOKENS - 1)]] + [rng.randrange(vocab)]
        for i in picks
    ]


def engine(model, **kw) -> Engine:
    """A deterministic engine by default; a pool of 8,192 slots (not sized from free memory, which the engines
    before it in the session may still hold in torch's cache)."""
    kw.setdefault("enable_deterministic_inference", True)
    kw.setdefault("max_bs", 16)
    kw.setdefault("kv_cache_tokens", 8192)
    return Engine(EngineConfig(model=str(model), context_len=256, **kw))


def generate(
    eng: Engine, prompts: list[list[int]], params: list[SamplingParams], groups: list[list[int]], stagger: int = 0
) -> list[Output]:
    """Submits the requests group by group, each group `stagger` steps after the one before (0: once the one
    before has finished), and steps until all finish. Returns each request's (token, logprob) per step."""
    outs: dict[int, Output] = {i: [] for g in groups for i in g}
    pending = list(groups)
    steps = 0
    while pending or eng.has_work:
        if pending and (not eng.has_work or (stagger and steps % stagger == 0)):
            for i in pending.pop(0):
                eng.add_request(f"q{i}", prompts[i], params[i])
        for o in eng.step():
            if o.token_id is not None:
                outs[int(o.rid[1:])].append((o.token_id, o.logprob))
        steps += 1
        assert steps < 20_000, "the engine did not finish"
    return [outs[i] for i in range(len(prompts))]


def alone(eng: Engine, prompts, params) -> list[Output]:
    """Each request by itself, one after another (the engine should have no radix cache: cold prefills)."""
    return generate(eng, prompts, params, [[i] for i in range(len(prompts))])


def random_groups(n: int, seed: int, largest: int = 16) -> list[list[int]]:
    """0..n-1 shuffled and cut into groups of 1 to `largest`."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    groups = []
    while order:
        size = rng.randint(1, largest)
        groups.append(order[:size])
        order = order[size:]
    return groups


# name -> (extra engine settings, how the requests are submitted: (n) -> (groups, stagger), runs on one engine)
SCENARIOS: dict[str, tuple[dict, Callable[[int], list[tuple[list[list[int]], int]]]]] = {
    # every request at once, prompts cut into chunks of at most 24 positions, mixed with decodes
    "all-at-once-chunked": (dict(max_num_batched_tokens=24), lambda n: [([list(range(n))], 0)]),
    # shuffled groups of 1-16 joining a running batch every 3 steps (cache hits on the shared prefixes)
    "staggered-groups": (dict(), lambda n: [(random_groups(n, 1), 3)]),
    # the same without overlap scheduling, groups of other sizes in another order
    "no-overlap": (dict(disable_overlap_schedule=True), lambda n: [(random_groups(n, 2, 7), 2)]),
    # twice on one engine, the second time in reverse order: every prompt but its last id is a cache hit
    "warm-cache": (
        dict(),
        lambda n: [([list(range(n))], 0), ([list(range(n - 1, -1, -1))], 0)],
    ),
    # a pool of 160 slots: sequences are preempted and recomputed, caches evicted
    "preempted": (dict(kv_cache_tokens=160, max_num_batched_tokens=32), lambda n: [(random_groups(n, 3), 1)]),
}


def run_scenario(model, name: str, prompts, params, **kw) -> tuple[list[list[Output]], dict]:
    """Every run of scenario `name` (one engine), and the engine's stats at the end."""
    extra, plan = SCENARIOS[name]
    eng = engine(model, **extra, **kw)
    try:
        runs = [generate(eng, prompts, params, groups, stagger) for groups, stagger in plan(len(prompts))]
        return runs, eng.stats()
    finally:
        eng.close()


def mismatches(reference: list[Output], got: list[Output]) -> list[int]:
    """The requests whose tokens or logprobs differ from the reference's at all."""
    return [i for i, (r, g) in enumerate(zip(reference, got)) if r != g]
