"""A step's inputs on CUDA (engine/runner/inputs.py, `pytest -m gpu`): decode_prep against the general torch
path, into the CUDA graph's buffers or new tensors; the pinned staging ring."""

import numpy as np
import pytest
import torch

from ringllm.engine import EngineConfig
from ringllm.engine.engine import Engine

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("host_tokens", [False, True], ids=["no-host-tokens", "host-tokens"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graph-buffers", "eager"])
def test_decode_prep_kernel_matches_the_torch_gathers(long_ckpt, enforce_eager, host_tokens, monkeypatch):
    """StepInputs.prepare of a decode step through kernels.decode_prep (into the CUDA graph's static
    buffers, padding rows included, or into new tensors without graphs) against the general torch path:
    the new slots written into req_to_slot, kv indices, out slots, positions, input ids, and the rest.
    `host_tokens`: the plan also carries tokens known on the host (written before the input ids are read)."""
    from ringllm.engine.core.plan import StepPlan
    from ringllm.engine.runner.inputs import StepInputs

    config = EngineConfig(
        model=str(long_ckpt), device="cuda", max_bs=16, context_len=3000, dtype="bfloat16",
        kv_cache_tokens=8192, enforce_eager=enforce_eager,
    )  # fmt: skip
    engine = Engine(config)
    try:
        runner = engine.runner
        g = torch.Generator(device="cuda").manual_seed(1)
        table = torch.randint(1, 8192, runner.req_to_slot.shape, device="cuda", generator=g, dtype=torch.int32)
        tokens = torch.randint(0, 512, runner.req_tokens.shape, device="cuda", generator=g, dtype=torch.int32)
        runner.req_tokens.copy_(tokens)
        rows = np.array([5, 0, 11, 2, 9], dtype=np.int32)
        starts = np.array([0, 2500, 1023, 1024, 17], dtype=np.int32)  # kv lens 1 .. 2501, across blocks of 1024
        empty = np.empty(0, dtype=np.int32)
        toks = [np.array(a, dtype=np.int32) for a in ([0, 9], [2500, 17], [77, 78])] if host_tokens else [empty] * 3
        plan = StepPlan(
            rows=rows, starts=starts, lens=np.ones(5, dtype=np.int32), sample=np.array([True, True, False, True, True]),
            slot_rows=rows, slot_pos=starts, slot_ids=np.array([101, 102, 103, 104, 105], dtype=np.int32),
            token_rows=toks[0], token_pos=toks[1], token_ids=toks[2],
        )  # fmt: skip
        assert runner.inputs.fits_decode_kernel(plan)
        runner.req_to_slot.copy_(table)
        if runner.graphs is not None:  # stale values where the padding row goes
            for buf in (runner.graphs.indices, runner.graphs.out_slots, runner.graphs.positions):
                buf.fill_(-1)
        meta, ix = runner.inputs.prepare(plan)
        assert ix.in_graph == (not enforce_eager)
        got = [t.clone() for t in (meta.kv_indices, meta.out_slots, ix.positions, ix.input_ids, ix.rows)]
        got += [t.clone() for t in (ix.seq_lens, ix.keep, ix.keep_flags, meta.qo_indptr, meta.kv_indptr)]
        table_after = runner.req_to_slot.clone()
        if host_tokens:  # rows 0 and 9 (batch entries 1 and 4) read the tokens the plan carried
            assert got[3][[1, 4]].tolist() == [77, 78]
        n = int(meta.kv_indptr_host[-1])
        if runner.graphs is not None:  # B = 5 replays the graph of 8: three padding rows, at slot 0
            gr = runner.graphs
            assert gr.indices[n : n + 3].tolist() == [0, 0, 0] and gr.indices[n + 3] == -1
            assert gr.out_slots[5:8].tolist() == [0, 0, 0] and gr.positions[5:8].tolist() == [0, 0, 0]
            assert gr.input_ids[5:8].tolist() == [0, 0, 0]
        runner.req_to_slot.copy_(table)
        monkeypatch.setattr(StepInputs, "fits_decode_kernel", lambda self, plan: False)
        ref_meta, ref = runner.inputs.prepare(plan)
        want = [ref_meta.kv_indices, ref_meta.out_slots, ref.positions, ref.input_ids, ref.rows]
        want += [ref.seq_lens, ref.keep, ref.keep_flags, ref_meta.qo_indptr, ref_meta.kv_indptr]
        assert torch.equal(table_after, runner.req_to_slot)
        for a, b in zip(got, want):
            assert torch.equal(a.long(), b.long())
        assert (meta.kv_indptr_host == ref_meta.kv_indptr_host).all() and meta.is_decode
    finally:
        engine.close()


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_staging_ring_waits_for_a_buffers_copy_before_rewriting_it(dtype):
    """More steps than buffers while the device lags: each step's parts arrive intact, so no buffer was
    rewritten before its copy ran; parts too large for a buffer are refused (the runner then pins a fresh
    array)."""
    from ringllm.engine.runner.staging import StagingRing

    device = torch.device("cuda")
    ring, rng = StagingRing(device, 2, 256), np.random.default_rng(0)
    sent = []
    for _ in range(6):
        torch.cuda._sleep(20_000_000)  # the copy queues behind this: the host runs ahead of it
        parts = [rng.integers(0, 1 << 30, n).astype(dtype) for n in (3, 5, 1, 0)]
        starts = [0, 4, 12, 16, 16]
        sent.append((parts, starts, ring.send(parts, starts, dtype)))
    for parts, starts, out in sent:
        assert out is not None and out.dtype == getattr(torch, np.dtype(dtype).name)
        for x, a in zip(parts, starts):
            assert out[a : a + len(x)].cpu().numpy().tolist() == x.tolist()
    assert ring.send([np.zeros(100, dtype=dtype)], [0, 100], dtype) is None
