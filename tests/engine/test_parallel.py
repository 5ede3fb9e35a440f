"""Tensor and pipeline parallelism on CPU (gloo): the same tokens as one rank, worker processes that start,
stop and fail cleanly, and a second "host" joining through torch.distributed's rendezvous."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import numpy as np
import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.core.plan import StepPlan
from ringllm.engine.engine import Engine
from ringllm.engine.parallel import Layout
from ringllm.engine.worker import decode_message, encode_plan
from ringllm.ipc.lifecycle import leftover_segments
from ringllm.ipc.ring import pid_alive
from tests.helpers import free_port, run_engine, tiny_checkpoint

MAX_NEW = 10
ROOT = Path(__file__).resolve().parents[2]  # the repository


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(2)
    shared = [rng.randrange(vocab) for _ in range(16)]
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 17, 1, 26, 9)] + [
        shared + [rng.randrange(vocab) for _ in range(n)] for n in (2, 7)
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {
        "qwen3": tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3")),
        "qwen2-tied": tiny_checkpoint("qwen2", tmp_path_factory.mktemp("qwen2"), tie=True),
        "llama": tiny_checkpoint("llama", tmp_path_factory.mktemp("llama")),
    }


def _config(path, **kw) -> EngineConfig:
    return EngineConfig(model=str(path), device="cpu", max_bs=8, seed=0, nccl_port=free_port(), **kw)


@pytest.mark.parametrize(
    "family,tp,pp,extra",
    [
        ("qwen3", 2, 1, {}),
        ("qwen2-tied", 1, 2, {}),
        ("llama", 2, 2, {}),
        ("qwen3", 1, 2, dict(max_num_batched_tokens=7, kv_cache_tokens=96)),  # chunked prefill and preemption
    ],
)
def test_parallel_greedy_matches_one_rank(checkpoints, family, tp, pp, extra):
    """Radix cache and overlap on; the second pass hits the cache."""
    path, prompts = checkpoints[family], _prompts(256)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    expected = run_engine(Engine(_config(path, **extra)), prompts, params, "a")
    engine = Engine(_config(path, tp_size=tp, pp_size=pp, **extra))
    try:
        assert run_engine(engine, prompts, params, "a") == expected
        assert run_engine(engine, prompts, params, "b") == expected
        stats = engine.stats()
        assert stats["running"] == stats["waiting"] == stats["kv_slots_used_by_requests"] == 0
        if "kv_cache_tokens" in extra:
            assert stats["preemptions"] > 0
        else:
            assert stats["prefix_cache_hit_tokens"] > 0
        procs = list(engine.workers.procs.values())
    finally:
        engine.close()
    assert all(not p.is_alive() for p in procs)
    assert [s for s in leftover_segments(os.getpid()) if "plans" in s] == []


def test_parallel_sampling_and_logprobs_match_one_rank(checkpoints):
    """Seeded sampling, penalties, logprobs and prompt logprobs travel from the last stage's sampler to rank 0
    intact."""
    path, prompts = checkpoints["qwen3"], _prompts(256)[:4]
    params = SamplingParams(
        max_tokens=6, temperature=0.8, seed=7, repetition_penalty=1.3, logprobs=3, prompt_logprobs=2, ignore_eos=True
    )

    def collect(engine):
        outs, prompt_lps = {}, {}
        for i, p in enumerate(prompts):
            engine.add_request(f"s{i}", p, params)
        while engine.has_work:
            for o in engine.step():
                outs.setdefault(o.rid, []).append((o.token_id, o.logprob, o.top_logprobs))
                if o.prompt_logprobs is not None:
                    prompt_lps[o.rid] = o.prompt_logprobs
        return outs, prompt_lps

    expected, expected_prompt = collect(Engine(_config(path)))
    engine = Engine(_config(path, tp_size=2, pp_size=2))
    try:
        got, got_prompt = collect(engine)
    finally:
        engine.close()
    assert got_prompt.keys() == expected_prompt.keys() == expected.keys()
    for rid, ref in expected_prompt.items():
        assert len(got_prompt[rid]) == len(ref)
        np.testing.assert_allclose([lp for lp, _ in got_prompt[rid]], [lp for lp, _ in ref], atol=1e-4)
        assert [[i for i, _ in top] for _, top in got_prompt[rid]] == [[i for i, _ in top] for _, top in ref]
    assert got.keys() == expected.keys()
    for rid in expected:
        assert [t for t, _, _ in got[rid]] == [t for t, _, _ in expected[rid]]
        np.testing.assert_allclose([lp for _, lp, _ in got[rid]], [lp for _, lp, _ in expected[rid]], atol=1e-4)
        assert [[i for i, _ in top] for _, _, top in got[rid]] == [[i for i, _ in top] for _, _, top in expected[rid]]


def test_layout_splits_layers_and_heads():
    assert [Layout(1, 3, r).layer_range(8) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 8)]
    assert Layout(2, 2, 3).pp_rank == 1 and Layout(2, 2, 3).tp_rank == 1
    assert Layout(2, 2, 0).token_ranks == [0, 1, 2] and Layout(2, 2, 2).is_sampler
    assert [Layout(4, 1, r).kv_heads(2) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]  # replicated
    assert [Layout(2, 1, r).kv_heads(8) for r in range(2)] == [(0, 4), (4, 4)]
    with pytest.raises(ValueError, match="attention heads"):
        Layout(3, 1, 0).check_heads(16, 8)
    with pytest.raises(ValueError, match="larger than"):
        Layout(1, 4, 0).layer_range(2)


def test_bad_parallel_settings_are_refused(checkpoints):
    with pytest.raises(ValueError, match="attention heads"):
        Engine(_config(checkpoints["qwen3"], tp_size=3))
    with pytest.raises(ValueError, match="tp_size and pp_size"):
        EngineConfig(tp_size=0)
    assert [s for s in leftover_segments(os.getpid()) if "plans" in s] == []


def test_plan_round_trips_through_the_wire():
    """Every field of StepPlan (its one declaration, engine/core/plan.py) arrives as sent, arrays with their
    dtypes."""
    plan = StepPlan(
        rows=np.array([3, 1], np.int32),
        starts=np.array([0, 5], np.int32),
        lens=np.array([4, 1], np.int32),
        sample=np.array([True, False]),
        slot_rows=np.array([3] * 4, np.int32),
        slot_pos=np.arange(4, dtype=np.int32),
        slot_ids=np.array([9, 8, 7, 6], np.int32),
        token_rows=np.array([3], np.int32),
        token_pos=np.array([0], np.int32),
        token_ids=np.array([42], np.int32),
        new_rows=[3],
        new_params=[SamplingParams(temperature=0.5, seed=3, stop_token_ids=[2])],
        new_prompt_lens=[4],
        num_decodes=1,
        shared_indptr=np.array([0, 2], np.int32),
        shared_lens=np.array([3], np.int32),
    )
    back = decode_message(encode_plan(plan))
    assert isinstance(back, StepPlan)
    for name in msgspec.structs.fields(StepPlan):
        sent, got = getattr(plan, name.name), getattr(back, name.name)
        if isinstance(sent, np.ndarray):
            assert got.dtype == sent.dtype, name.name
            np.testing.assert_array_equal(got, sent)
        else:
            assert got == sent, name.name
    assert (
        decode_message(
            encode_plan(StepPlan(rows=plan.rows, starts=plan.starts, lens=plan.lens, sample=plan.sample))
        ).slot_ids.size
        == 0
    )


_CHILD = textwrap.dedent("""
    import sys, time
    from ringllm.engine import EngineConfig, SamplingParams
    from ringllm.engine.engine import Engine
    from ringllm.engine.logs import configure_logging
    if __name__ == "__main__":
        configure_logging("info")
        e = Engine(EngineConfig(model=sys.argv[1], device="cpu", max_bs=4, tp_size=2, nccl_port=int(sys.argv[2])))
        print("workers", *[p.pid for p in e.workers.procs.values()], flush=True)
        i = 0
        while True:  # keeps the ranks inside collectives when the kill comes
            e.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.0))
            while e.has_work:
                e.step()
            i += 1
""")


def _start_child(path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    line = proc.stdout.readline()
    if not line.startswith("workers"):
        proc.kill()
        pytest.fail(f"the engine did not start: {line}{proc.stderr.read()}")
    return proc, [int(x) for x in line.split()[1:]]


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pid_alive(pid)


def test_a_dead_worker_takes_the_engine_down_cleanly(checkpoints):
    proc, workers = _start_child(checkpoints["qwen3"])
    time.sleep(0.5)
    os.kill(workers[0], signal.SIGKILL)
    assert proc.wait(timeout=15) == 1
    assert leftover_segments(proc.pid) == []
    # Not asserted: the watcher's "worker died" line. Beside 3 CPU hogs it is missing in ~1 run of 4 although the
    # watcher thread does exit (strace: it calls exit_group(1) after the clean-up, with no write before): an open
    # defect, written up in docs/PERFORMANCE.md's suite section and the session's notes.


def test_workers_exit_when_the_engine_is_killed(checkpoints):
    proc, workers = _start_child(checkpoints["qwen3"])
    time.sleep(0.5)
    proc.kill()
    proc.wait(timeout=5)
    assert all(_gone(pid, 5.0) for pid in workers)


def test_a_second_node_joins_through_the_rendezvous(checkpoints):
    """Two "hosts" on loopback: node 1 runs rank 1 (`ringllm serve --node-rank 1`), fed over gloo."""
    path, port = checkpoints["llama"], free_port()
    prompts = _prompts(256)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    expected = run_engine(Engine(_config(path)), prompts, params, "a")
    node1 = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ringllm",
            "serve",
            "--model",
            str(path),
            "--device",
            "cpu",
            "--tp-size",
            "2",
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
            "--max-bs",
            "8",
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        engine = Engine(
            EngineConfig(
                model=str(path), device="cpu", max_bs=8, tp_size=2, nnodes=2, master_addr="127.0.0.1", nccl_port=port
            )
        )
        try:
            assert run_engine(engine, prompts, params, "a") == expected
        finally:
            engine.close()
        assert node1.wait(timeout=20) == 0, node1.stderr.read()
    finally:
        if node1.poll() is None:
            node1.kill()
