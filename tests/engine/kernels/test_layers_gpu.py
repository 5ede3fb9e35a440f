"""The layer kernels (engine/kernels/layers.py) against the torch layers (`pytest -m gpu`): add+RMSNorm, SiLU,
q/k norm + rotary, the fused q|k|v store (bf16 and fp8 caches), the skinny GEMM."""

import pytest
import torch

from ringllm.engine.kv_cache import KVPool
from tests.engine.gpu_helpers import attention_metadata, rel

pytestmark = pytest.mark.gpu


def test_triton_kernels_match_torch_layers():
    from ringllm.engine.models.decoder import ModelShape
    from ringllm.engine.models.layers import Attention, RMSNorm, Rotary, silu_and_mul
    from ringllm.engine.parallel import Layout

    torch.manual_seed(0)
    x, res = torch.randn(37, 1024, dtype=torch.bfloat16), torch.randn(37, 1024, dtype=torch.bfloat16)
    norm = RMSNorm(1024, 1e-6)
    norm.weight.data.normal_(1.0, 0.1)
    norm = norm.to(torch.bfloat16)
    assert rel(norm.cuda()(x.cuda()), norm.cpu()(x)) < 1e-2
    out_gpu, res_gpu = norm.cuda()(x.cuda(), res.cuda().clone())
    out_cpu, res_cpu = norm.cpu()(x, res.clone())
    assert rel(out_gpu, out_cpu) < 1e-2 and rel(res_gpu, res_cpu) < 1e-2
    g = torch.randn(37, 2 * 3072, dtype=torch.bfloat16)
    assert rel(silu_and_mul(g.cuda()), silu_and_mul(g)) < 1e-2
    # q/k norm + rotary through the attention layer's own code paths (CPU torch vs CUDA Triton).
    shape = ModelShape(
        "Qwen3ForCausalLM",
        100,
        256,
        512,
        1,
        4,
        2,
        128,
        1e-6,
        512,
        {"rope_theta": 1e6},
        True,
        False,
        True,
        [],
        None,
        None,
    )
    shape.rotary = Rotary(128, 512, shape.rope)
    layer = Attention(0, shape, Layout())
    for p in layer.parameters():
        p.data.normal_(1.0 if p.dim() == 1 else 0.0, 0.1 if p.dim() == 1 else 0.05)

    class Echo:  # attention stand-in: returns q so the test sees norm + rotary only
        def kv_store_target(self, layer_id):
            return None  # K/V come to forward(): the unfused path

        def forward(self, layer_id, q, k, v):
            self.k = k
            return q

    h, pos = torch.randn(9, 256), torch.tensor([0, 1, 2, 50, 51, 300, 7, 8, 511])
    cpu_echo, gpu_echo = Echo(), Echo()
    out_cpu = layer.float()(h, pos, cpu_echo)
    out_gpu = layer.cuda()(h.cuda(), pos.cuda(), gpu_echo)
    assert rel(out_gpu, out_cpu) < 1e-4 and rel(gpu_echo.k, cpu_echo.k) < 1e-4


@pytest.mark.parametrize(
    "qk_norm,H,Hkv", [(True, 16, 8), (False, 16, 8), (True, 8, 4)], ids=["qwen3", "llama", "qwen3-tp2-rank"]
)
def test_fused_qkv_store_attention_matches_unfused(qk_norm, H, Hkv):
    """The attention layer over FlashInfer (q/k norm, rotary and the K/V store in one kernel) against the same
    layer over the torch backend (norm + rotary kernels, then index_put, then SDPA): the same output, the
    same K/V in the written slots, and every other slot untouched. Also at one TP=2 rank's heads of
    Qwen3-0.6B (8 query, 4 KV heads)."""
    from ringllm.engine.attention.flashinfer_backend import FlashInferAttention
    from ringllm.engine.attention.torch_backend import TorchAttention
    from ringllm.engine.models.decoder import ModelShape
    from ringllm.engine.models.layers import Attention, Rotary
    from ringllm.engine.parallel import Layout

    device, D = torch.device("cuda"), 128
    shape = ModelShape(
        "Qwen3ForCausalLM",
        100,
        1024,
        3072,
        1,
        H,
        Hkv,
        D,
        1e-6,
        2048,
        {"rope_theta": 1e6},
        True,
        False,
        qk_norm,
        [],
        None,
        None,
    )
    shape.rotary = Rotary(D, 2048, shape.rope).to(device)
    torch.manual_seed(1)
    layer = Attention(0, shape, Layout()).to(device)
    for p in layer.parameters():
        p.data.normal_(1.0 if p.dim() == 1 else 0.0, 0.1 if p.dim() == 1 else 0.03)
    layer = layer.to(torch.bfloat16)
    new_lens, cached = [1, 7, 1, 40], [100, 0, 513, 17]
    kv_lens = [n + c for n, c in zip(new_lens, cached)]
    positions = torch.tensor([c + j for n, c in zip(new_lens, cached) for j in range(n)], device=device)
    x = torch.randn(sum(new_lens), 1024, device=device, dtype=torch.bfloat16)
    outs, pools = [], []
    for cls in (TorchAttention, FlashInferAttention):
        pool = KVPool(1, 4096, Hkv, D, torch.bfloat16, device)
        torch.manual_seed(2)
        pool.k.normal_(), pool.v.normal_()
        meta = attention_metadata(kv_lens, new_lens, 4096, device)
        attn = cls(pool, H, D)
        attn.begin(meta)
        with torch.inference_mode():
            outs.append(layer(x, positions, attn).float())
        pools.append(pool)
    assert rel(outs[1], outs[0]) < 1e-2
    slots = meta.out_slots
    assert rel(pools[1].k[0][slots], pools[0].k[0][slots]) < 1e-3
    assert torch.equal(pools[1].v[0][slots], pools[0].v[0][slots])
    others = torch.ones(4096, dtype=torch.bool, device=device)
    others[slots] = False
    assert torch.equal(pools[1].k[0][others], pools[0].k[0][others])
    assert torch.equal(pools[1].v[0][others], pools[0].v[0][others])


def test_skinny_linear_matches_cublas():
    """kernels.linear's skinny GEMM (row-parallel weights at decode batch sizes) against F.linear in float64, at
    Qwen3-0.6B's o_proj/down_proj shapes on one GPU and on each rank of TP=2 (1024 x 1024, 1024 x 1536)."""
    from ringllm.engine.kernels import layers as kernels

    torch.manual_seed(3)
    for M in (1, 2, 5, 16, 17):
        for N, K in ((1024, 2048), (1024, 3072), (1024, 1024), (1024, 1536), (1000, 1100)):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.05
            ref = x.double() @ w.double().T
            assert rel(kernels.linear(x, w), ref) < 1e-2
            assert rel(kernels.linear(x[None], w)[0], ref) < 1e-2  # leading dims kept


FP8 = torch.float8_e4m3fn


def test_fused_qkv_store_into_fp8_equals_the_torch_store():
    """qkv_rope_store into an fp8 cache writes exactly what the same kernel's bf16 K/V become through the torch
    store (KVPool.store: clamp to +-448, round to nearest even): bit for bit, out-of-range values included,
    no NaN, every other slot untouched; q is the same as with a bf16 cache."""
    from ringllm.engine.kernels import layers as kernels
    from ringllm.engine.models.layers import Rotary

    torch.manual_seed(0)
    device, T, H, Hkv, D = torch.device("cuda"), 37, 16, 8, 128
    qkv = torch.randn(T, (H + 2 * Hkv) * D, device=device, dtype=torch.bfloat16) * 4
    qkv[3, (H + Hkv) * D + 5] = 3000.0  # a value beyond fp8's range, and one far beyond it
    qkv[9, (H + Hkv) * D + 70] = -1e6
    qw, kw = (torch.randn(D, device=device, dtype=torch.bfloat16) * s for s in (1.0, 200.0))  # keys past 448 too
    rotary = Rotary(D, 2048, {"rope_theta": 1e6}).to(device)
    positions = torch.randint(0, 2048, (T,), device=device)
    slots = torch.randperm(1000, device=device)[:T] + 1
    outs = {}
    for dtype in (torch.bfloat16, FP8):
        pool = KVPool(1, 1024, Hkv, D, torch.bfloat16, device, dtype)
        q = kernels.qkv_rope_store(
            qkv, H, Hkv, D, qw, kw, 1e-6, rotary.cos, rotary.sin, positions, slots, pool.k[0], pool.v[0]
        )
        outs[dtype] = q, pool
    (q16, p16), (q8, p8) = outs[torch.bfloat16], outs[FP8]
    assert torch.equal(q16, q8)
    ref = KVPool(1, 1024, Hkv, D, torch.bfloat16, device, FP8)
    ref.store(0, slots, p16.k[0][slots], p16.v[0][slots])
    assert p16.k[0][slots].float().abs().max() > 448 and p16.v[0][slots].float().abs().max() > 448
    for got, want in ((p8.k[0], ref.k[0]), (p8.v[0], ref.v[0])):
        assert not got.float().isnan().any()
        assert got.float().abs().max() == 448.0
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # untouched slots are zero in both
