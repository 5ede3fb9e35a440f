"""Cascade attention on FlashInfer (`pytest -m gpu`): eager and CUDA-graph cascade against plain decode on
ragged groups, and on the prefix workload's shape the greedy tokens of cascade against plain decode and of
cascade graphs against eager cascade."""

import numpy as np
import pytest
import torch

from ringllm.engine.attention import AttentionMetadata
from ringllm.engine.kv_cache import KVPool
from tests.engine.gpu_helpers import greedy_agreement, prefix_shape_greedy, rel

pytestmark = pytest.mark.gpu


def _ragged_groups_on_gpu(Hkv):
    """Groups of 3, 1 and 5 rows sharing prefixes of 300, 64 and 1,000 slots (a group of one still runs
    both levels), then 2 rows with nothing shared; every row has its own tail of ragged length, in request rows
    in no particular order. Returns (backend, its pool, q, k, v, meta(cascade=None), plan_cascade's metadata)."""
    from ringllm.engine.attention.cascade import plan_cascade
    from ringllm.engine.attention.flashinfer_backend import FlashInferAttention

    device, H, D, num_slots = torch.device("cuda"), 16, 128, 8192
    rng = np.random.default_rng(1)
    free = iter(rng.permutation(np.arange(1, num_slots)).tolist())
    sizes, shared = [3, 1, 5], [300, 64, 1000]
    tails = [1, 7, 130, 2, 1, 40, 3, 9, 500, 17, 1]  # own positions per row, the new one included
    prefixes = [[next(free) for _ in range(n)] for n in shared]
    slot_lists = [p for p, s in zip(prefixes, sizes) for _ in range(s)] + [[], []]
    slot_lists = [p + [next(free) for _ in range(t)] for p, t in zip(slot_lists, tails)]
    B = len(slot_lists)
    rows = rng.permutation(np.arange(B)).astype(np.int32) + 3  # request rows in no particular order
    table = torch.zeros(B + 3, 2048, dtype=torch.int32, device=device)
    for r, slots in zip(rows, slot_lists):
        table[r, : len(slots)] = torch.tensor(slots, dtype=torch.int32)
    kv_lens = np.array([len(s) for s in slot_lists])
    kvp = np.concatenate([[0], np.cumsum(kv_lens)])
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.int32, device=device)
    indices = t(np.concatenate(slot_lists))
    out_slots = t([s[-1] for s in slot_lists]).long()
    qo = np.arange(B + 1)

    def meta(cascade=None):
        return AttentionMetadata(qo, kvp, kv_lens, True, t(qo), t(kvp), indices, out_slots, cascade)

    torch.manual_seed(0)
    pool = KVPool(1, num_slots, Hkv, D, torch.bfloat16, device)
    pool.k.normal_(), pool.v.normal_()
    q, k, v = (torch.randn(B, h, D, device=device, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    cascade = plan_cascade(rows, kv_lens, indptr, np.array(shared, np.int32), table)
    assert cascade.num_grouped == 9
    return FlashInferAttention(pool, H, D), pool, q, k, v, meta, cascade


def _per_row_rel(got, ref) -> float:
    return ((got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max().item()


@pytest.mark.parametrize("Hkv", [8, 4], ids=["gqa2", "gqa4-tensor-core-decode"])
def test_cascade_decode_matches_plain_decode_on_ragged_groups(Hkv):
    """Cascade (level 0 + level 1 + merge) on _ragged_groups_on_gpu must give what plain decode over each row's
    whole slot list gives."""
    from ringllm.engine.attention.torch_backend import TorchAttention

    fi, pool, q, k, v, meta, cascade = _ragged_groups_on_gpu(Hkv)
    fi.begin(meta())
    plain = fi.forward(0, q, k, v).float()
    fi.begin(meta(cascade))
    assert fi.wrapper is fi.cascade
    got = fi.forward(0, q, k, v).float()
    ref_attn = TorchAttention(pool, fi.num_heads, fi.head_dim)
    ref_attn.begin(meta())
    ref = ref_attn.forward(0, q, k, v).float()
    assert _per_row_rel(got, plain) < 1e-2, _per_row_rel(got, plain)
    assert rel(got, ref) < 1e-2 and rel(plain, ref) < 1e-2


@pytest.mark.parametrize("Hkv", [8, 4], ids=["gqa2", "gqa4-tensor-core-decode"])
def test_graph_cascade_matches_eager_cascade_and_plain_decode(Hkv):
    """The cascade graphs of buckets 32 and 16, captured in that order as DecodeGraphs does (the shared
    level-0 wrapper's first plan fixes its query rows at the largest bucket), replayed on _ragged_groups_on_gpu
    (11 rows: 3 groups, fewer than MAX_GROUPS, 2 ungrouped rows, then padding rows up to the bucket, whose
    queries are noise): the 11 rows equal eager cascade's and plain decode's, every row is finite, and the
    plain graph of the same bucket (sharing the level-1 wrapper) still gives plain decode after a cascade
    replay."""
    from ringllm.engine.attention.cascade import fill_graph_buffers
    from ringllm.engine.core.cascade import MAX_GROUPS

    fi, _, q, k, v, meta, cascade = _ragged_groups_on_gpu(Hkv)
    fi.begin(meta())
    plain = fi.forward(0, q, k, v).float()  # stores the new K/V too
    fi.begin(meta(cascade))
    eager = fi.attend(0, q).float()
    device, b, context = q.device, len(q), 2048
    unique_buf = torch.zeros(32 * context, dtype=torch.int32, device=device)
    shared_buf = torch.zeros(MAX_GROUPS * context + MAX_GROUPS + 1, dtype=torch.int32, device=device)
    q_static = torch.zeros(32, *q.shape[1:], dtype=q.dtype, device=device)
    out_slots = torch.zeros(32, dtype=torch.long, device=device)
    graphs, outs, plain_graphs, plain_outs = {}, {}, {}, {}

    def capture(bs):
        fi.attend(0, q_static[:bs])  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fi.attend(0, q_static[:bs])
        return graph, out

    for bs in (32, 16):
        fi.make_graph_decoder(bs, unique_buf)
        fi.begin_graph(bs, np.arange(bs + 1), unique_buf[:bs], out_slots[:bs])
        plain_graphs[bs], plain_outs[bs] = capture(bs)
        fi.make_graph_cascade(bs, shared_buf)
        layout, unique = fill_graph_buffers(None, bs, unique_buf, shared_buf)
        fi.begin_graph(bs, layout.unique_kv_indptr_host, unique, out_slots[:bs], cascade=layout)
        graphs[bs], outs[bs] = capture(bs)
    for bs in (16, 32):
        q_static[:b] = q
        q_static[b:] = torch.randn_like(q_static[b:]) * 4
        layout, unique = fill_graph_buffers(cascade, bs, unique_buf, shared_buf)
        assert layout.num_grouped == 9 and layout.shared_qo_indptr_host[-1] == bs
        fi.begin_graph(bs, layout.unique_kv_indptr_host, unique, out_slots[:bs], cascade=layout)
        graphs[bs].replay()
        torch.cuda.synchronize()
        got = outs[bs][:b].float()
        assert torch.isfinite(outs[bs]).all()
        assert _per_row_rel(got, eager) < 1e-2, (bs, _per_row_rel(got, eager))
        assert _per_row_rel(got, plain) < 1e-2, (bs, _per_row_rel(got, plain))
        # the plain graph after it: its decode wrapper planned over the whole slot lists again
        n = len(meta().kv_indices)
        unique_buf[:n] = meta().kv_indices
        unique_buf[n : n + bs - b] = 0
        kv_indptr = np.concatenate([meta().kv_indptr_host, n + np.arange(1, bs - b + 1)])
        fi.begin_graph(bs, kv_indptr, unique_buf[: n + bs - b], out_slots[:bs])
        plain_graphs[bs].replay()
        torch.cuda.synchronize()
        assert _per_row_rel(plain_outs[bs][:b].float(), plain) < 1e-2, bs


def test_cascade_greedy_tokens_match_plain_decode_where_bf16_allows(qwen3_06b):
    """Qwen3-0.6B's shape on the prefix workload's shape: with cascade on, decode steps run it (in cascade
    CUDA graphs, every one of them), and the greedy tokens equal cascade off (CUDA graphs, plain decode) until
    the first step where the top two candidates were within 0.1 nats; up to there the chosen tokens' logprobs
    agree within 0.1."""
    ref, ref_steps, _ = prefix_shape_greedy(qwen3_06b, disable_cascade_attention=True)
    got, got_steps, graph_steps = prefix_shape_greedy(qwen3_06b)
    assert ref_steps == 0 and got_steps >= 10 and graph_steps == got_steps, (ref_steps, got_steps, graph_steps)
    print(f"cascade: {got_steps} steps; greedy matched before divergence {greedy_agreement(ref, got)}")
    ref_lp, got_lp = [], []
    for r, g in zip(ref, got):
        assert len(r) == len(g) == 24
        for (tok_r, top_r), (tok_g, top_g) in zip(r, g):
            if tok_r != tok_g:
                margin = top_r[0][1] - top_r[1][1]
                assert margin < 0.1, f"diverged at a clear margin of {margin:.3f} nats"
                break
            ref_lp.append(top_r[0][1])
            got_lp.append(top_g[0][1])
    # the first token comes from a prefill step; past it, matched tokens come from cascade steps
    assert len(ref_lp) >= len(ref) + 16, len(ref_lp)
    assert max(abs(a - b) for a, b in zip(got_lp, ref_lp)) < 0.1


def test_cascade_graphs_give_the_greedy_tokens_of_eager_cascade(qwen3_06b):
    """The same cascade steps eagerly (enforce_eager: FlashInferCascade, MIN_SAVED_TOKENS) and replayed from
    cascade graphs (FlashInferGraphCascade): greedy tokens equal until a near-tie (top two within 0.1 nats),
    the matched tokens' logprobs within 0.1."""
    ref, ref_steps, ref_graph_steps = prefix_shape_greedy(qwen3_06b, enforce_eager=True)
    got, got_steps, graph_steps = prefix_shape_greedy(qwen3_06b)
    assert ref_steps >= 10 and ref_graph_steps == 0 and graph_steps == got_steps >= 10, (
        ref_steps,
        got_steps,
        graph_steps,
    )
    matched, margins = greedy_agreement(ref, got)
    print(f"graph cascade vs eager cascade: greedy matched {matched}, margins at divergence {margins}")
    assert all(m < 0.1 for m in margins), margins
    assert matched >= len(ref) + 16, matched
    gaps = []  # of the chosen tokens' logprobs, up to each request's first divergence
    for r, g in zip(ref, got):
        for (tok_r, top_r), (tok_g, top_g) in zip(r, g):
            if tok_r != tok_g:
                break
            gaps.append(abs(top_r[0][1] - top_g[0][1]))
    assert max(gaps) < 0.1, max(gaps)
