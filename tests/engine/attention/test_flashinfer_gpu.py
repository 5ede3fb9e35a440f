"""The FlashInfer backend against the torch reference (`pytest -m gpu`): attention over bf16 and fp8 caches."""

import pytest
import torch

from ringllm.engine.kv_cache import KVPool
from tests.engine.gpu_helpers import attention_metadata

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("new_lens", [[1, 1, 1, 1], [5, 1, 37, 64]])
@pytest.mark.parametrize("Hkv", [8, 4], ids=["gqa2", "gqa4-tensor-core-decode"])
def test_flashinfer_matches_torch_attention(new_lens, Hkv):
    from ringllm.engine.attention.flashinfer_backend import FlashInferAttention
    from ringllm.engine.attention.torch_backend import TorchAttention

    device, H, D = torch.device("cuda"), 16, 128
    kv_lens = [n + p for n, p in zip(new_lens, [100, 0, 300, 17])]
    outs = []
    for cls in (TorchAttention, FlashInferAttention):
        torch.manual_seed(0)
        pool = KVPool(1, 2048, Hkv, D, torch.bfloat16, device)
        pool.k.normal_(), pool.v.normal_()
        meta = attention_metadata(kv_lens, new_lens, 2048, device)
        T = sum(new_lens)
        q, k, v = (torch.randn(T, h, D, device=device, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
        attn = cls(pool, H, D)
        attn.begin(meta)
        outs.append(attn.forward(0, q, k, v).float())
    err = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert err < 1e-2, err


@pytest.mark.parametrize("new_lens", [[1, 1, 1, 1], [5, 1, 37, 64]], ids=["decode", "prefill"])
@pytest.mark.parametrize("Hkv", [8, 4], ids=["gqa2", "gqa4-tensor-core-decode"])
def test_flashinfer_over_fp8_cache_matches_torch_attention(new_lens, Hkv):
    """FlashInfer's decode (plain and tensor-core) and prefill kernels with bf16 q over an fp8 K/V cache against
    the torch backend over the same fp8 cache (which upcasts it): the same attention, up to bf16 rounding."""
    from ringllm.engine.attention.flashinfer_backend import FlashInferAttention
    from ringllm.engine.attention.torch_backend import TorchAttention

    device, H, D = torch.device("cuda"), 16, 128
    kv_lens = [n + p for n, p in zip(new_lens, [100, 0, 300, 17])]
    outs, pools = [], []
    for cls in (TorchAttention, FlashInferAttention):
        torch.manual_seed(0)
        pool = KVPool(1, 2048, Hkv, D, torch.bfloat16, device, FP8)
        pool.k.copy_(torch.randn(pool.k.shape, device=device)), pool.v.copy_(torch.randn(pool.v.shape, device=device))
        meta = attention_metadata(kv_lens, new_lens, 2048, device)
        T = sum(new_lens)
        q, k, v = (torch.randn(T, h, D, device=device, dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
        attn = cls(pool, H, D)
        attn.begin(meta)
        out = attn.forward(0, q, k, v)
        assert out.dtype == torch.bfloat16
        outs.append(out.float())
        pools.append(pool)
    assert torch.equal(pools[0].k.view(torch.uint8), pools[1].k.view(torch.uint8))  # the same store
    err = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert err < 1e-2, err


FP8 = torch.float8_e4m3fn
