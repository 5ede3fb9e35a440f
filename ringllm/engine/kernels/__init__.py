"""Triton kernels of the GPU path, one file per family: `layers` (a decoder layer's small fused operations),
`sampling` (one-pass Gumbel-max sampling), `decode_prep` (a decode step's input preparation) and
`batch_invariant` (the GEMM of deterministic inference). They run on CUDA tensors only; the plain-torch code
they replace stays the reference on every device. Importing any of them needs no GPU, nor Triton: on a
CPU-only install `triton` is None and `available` says no."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None
    tl = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on `x` (a CUDA tensor, with Triton installed)."""
    return triton is not None and x.is_cuda
