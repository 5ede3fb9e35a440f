"""Deterministic inference (--enable-deterministic-inference): the same request gives the same tokens (and the
same logprobs, bit for bit) whatever else shares its batches, however its prompt is chunked, and whether its
prefix comes from the radix cache or is computed cold. The switches are made once, when the engine is built;
the default mode runs none of this code.

Why outputs move in the default mode: floating-point addition is not associative, and the fast kernels choose
how to split their reductions by the shape of the whole batch (cuBLAS picks tiles and split-K by the number of
rows; FlashInfer splits a sequence's KV across blocks when the batch is small, picks its query tile by the
batch's mean query length, and runs decode rows through another kernel than prefill rows; MKL on the CPU runs 1
row, 2-3 rows and 4+ rows through three different kernels, measured). A row's numbers then depend on its
neighbours, near-ties flip, and greedy outputs part.

What guarantees what, op by op (each must reduce a row the same way whatever the batch):
- Linear layers and the LM head (`linear`). CUDA: one Triton GEMM for every number of rows, its tiles a
  function of the weight alone, K reduced in one fixed order, no split-K (kernels/batch_invariant.py). CPU: at
  least MIN_CPU_ROWS rows per call (zero rows added below), so MKL always takes its many-row kernel, which
  computes each row the same way at any row count and position (checked by tests/engine/test_determinism.py).
- Attention. FlashInfer (attention/flashinfer_invariant.py): every row, decode or prefill, eager or in a CUDA
  graph, goes through the same FA2 prefill kernel with split-KV disabled and its query tile fixed at 16, so a
  row reduces over its own keys in blocks aligned at position 0: the result depends on the position and the
  keys alone, not on the chunk it is in, the batch or whether the prefix was cached. Cascade attention is off.
  The torch backend (attention/torch_backend.py) attends one row at a time through matmuls whose shapes
  depend on the row's position alone.
- Hence decode computes a position's K/V exactly as prefill does: the radix cache can hold generated tokens,
  a cache hit gives the tokens of a cold prefill, and a preempted sequence recomputes the same values. No
  chunk alignment is needed.
- RMSNorm, the per-head q/k norm with rotary, SiLU-and-mul, the residual adds: one program (or one torch
  row-wise reduction) per row over the whole hidden size, already invariant. The tensor-parallel all-reduce
  adds two partial sums in one commutative step at tp = 2 (more ranks are refused: EngineConfig).
- Sampling: greedy is the first maximal logit, found exactly in any order. A sampled row draws its noise from
  a hash of (seed, output index, token id) (engine/sampler/sampler.py, kernels/sampling.py: the fused
  kernel's chunking by batch size changes which program finds the maximum, never the maximum), so here every
  request without a seed gets the engine's --seed (`request_params`): identical requests draw identical
  noise, and n > 1 choices of one request differ only with a seed (choice j uses seed + j). Logprobs are
  torch's log_softmax, one block per row configured by the vocabulary size alone.

Not covered: top-logprob lists may order exactly tied values differently; tensor parallelism beyond 2 ranks;
a different GPU model, driver, or library version (another cuBLAS, Triton or FlashInfer) may round
differently, though each is deterministic with itself."""

from __future__ import annotations

import msgspec
import torch
import torch.nn.functional as F

from ringllm.engine.kernels import available
from ringllm.engine.sampling_params import SamplingParams

# MKL computes 1 row, 2-3 rows and 4 or more rows with different kernels (measured on the 2-core AVX-512 box:
# a row's result changes between them and not beyond); 16 leaves room for other vector widths.
MIN_CPU_ROWS = 16


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear whose every row is computed the same way whatever the other rows are (module docstring)."""
    if available(x):
        from ringllm.engine.kernels import batch_invariant

        return batch_invariant.matmul(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    rows = x2.shape[0]
    if rows >= MIN_CPU_ROWS:
        return F.linear(x, weight, bias)
    padded = torch.zeros((MIN_CPU_ROWS, x2.shape[1]), dtype=x.dtype, device=x.device)
    padded[:rows] = x2
    return F.linear(padded, weight, bias)[:rows].reshape(*x.shape[:-1], weight.shape[0])


def request_params(params: SamplingParams, default_seed: int) -> SamplingParams:
    """A request's parameters as deterministic mode samples them: without a seed, the engine's."""
    return params if params.seed is not None else msgspec.structs.replace(params, seed=default_seed)
