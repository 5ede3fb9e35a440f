"""The batch-invariant GEMM (engine/kernels/batch_invariant.py) on the CPU, through Triton's interpreter (a
subprocess: TRITON_INTERPRET must be set before Triton is imported): its tiles, masks, grouped order and bias
give F.linear's result for shapes that fill no tile evenly. Bit-for-bit invariance needs the GPU's compiled
kernel: test_batch_invariant_gpu.py."""

import os
import subprocess
import sys

import pytest

from ringllm.engine.kernels import triton

SCRIPT = """
import torch
from ringllm.engine.kernels import batch_invariant as bi
torch.manual_seed(0)
for M, N, K in [(1, 40, 70), (5, 100, 130), (70, 33, 64), (130, 2100, 96)]:
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double()).float()
    assert torch.allclose(bi.matmul(x, w, b), ref, atol=1e-4), (M, N, K)
    assert torch.allclose(bi.matmul(x[None], w)[0], ref - b, atol=1e-4), (M, N, K)
print("ok")
"""


@pytest.mark.skipif(triton is None, reason="needs Triton (its interpreter)")
def test_matmul_equals_linear_for_uneven_shapes_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
