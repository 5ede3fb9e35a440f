"""The batch-invariant GEMM on the GPU (`pytest -m gpu`): a row's result is the same bits at any number of
rows and at any position among them, for Qwen3-0.6B's weight shapes, in bf16 and float32, and it agrees with
F.linear within the dtype's rounding."""

import random

import pytest
import torch

from ringllm.engine.kernels.batch_invariant import matmul

pytestmark = pytest.mark.gpu
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151_936, 1024)]  # q|k|v, o, gate|up, down, head


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, k", SHAPES)
def test_a_row_is_the_same_at_any_row_count_and_position(n, k, dtype):
    torch.manual_seed(0)
    weight = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    rows = torch.randn(600, k, device="cuda").to(dtype)
    ref = matmul(rows[:1], weight, bias)[0]
    close = torch.nn.functional.linear(rows[:1].float(), weight.float(), bias.float())[0]
    assert torch.allclose(ref.float(), close, atol=0.05 if dtype == torch.bfloat16 else 1e-3, rtol=0.02)
    rng = random.Random(0)
    for count in [2, 3, 7, 16, 17, 63, 64, 65, 256, 600]:
        at = rng.randrange(count)
        batch = torch.cat([rows[1 : at + 1], rows[:1], rows[at + 1 : count]])
        assert torch.equal(matmul(batch, weight, bias)[at], ref), count
