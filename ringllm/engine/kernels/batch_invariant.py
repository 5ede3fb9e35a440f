"""Triton kernel of deterministic inference: a GEMM whose every output element is computed the same way
whatever the number of rows (`matmul`), for every linear layer and the LM head when
--enable-deterministic-inference is on (engine/determinism.py says what guarantees what).

Why: cuBLAS chooses its kernel, its tiles and whether to split K by the shape, so the same row of
activations times the same weight rounds differently in a batch of 1, of 7 and of 256; ringllm's own skinny
kernel (layers.linear) serves M <= 16 and cuBLAS the rest. Here one compiled kernel serves every M: its tiles
depend only on the weight's shape (`tile_config`), K is reduced in BLOCK_K steps from 0 upwards by the same
tl.dot in one program (no split-K), and a row's result never reads another row (rows past M load zeros). M
is not specialized (Triton would compile another variant for M == 1). The price: at small M the tiles are
wider than a decode step wants (fewer programs stream the weight) and at large M narrower than cuBLAS's.
Importing this module needs no GPU."""

from __future__ import annotations

import torch

from ringllm.engine.kernels import tl, triton

if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _matmul_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        y_ptr,
        M,
        N,
        K,
        x_stride,
        w_stride,
        y_stride,
        HAS_BIAS: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """y = x W^T (+ b) over one BLOCK_M x BLOCK_N tile. Tiles are visited in groups of GROUP_M row-tiles
        (the weight strip stays in L2 while they pass), which changes which program computes a tile, never how."""
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
        pid_n = (pid % (GROUP_M * num_n)) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * x_stride
        w_rows = w_ptr + offs_n[:, None].to(tl.int64) * w_stride
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_rows + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < K), other=0.0)
            w = tl.load(w_rows + kk[None, :], mask=(offs_n[:, None] < N) & (kk[None, :] < K), other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y = y_ptr + offs_m[:, None].to(tl.int64) * y_stride + offs_n[None, :]
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def tile_config(n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a weight of n output rows and k inputs: a function
    of the weight alone, so a layer reduces the same way at every batch size. BLOCK_M 64 with 4 warps is one
    warpgroup's tile on Hopper; narrow weights (o_proj, down_proj) get narrow tiles, so a decode step still has
    some 32 programs streaming them. float32 runs IEEE dots (no tf32), in fewer stages for shared memory."""
    block_n = 32 if n <= 2048 else 64 if n < 8192 else 128
    return 64, block_n, 64, 4, 3 if dtype == torch.float32 else 4


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) computed row by row identically at any number of rows (module docstring)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    M, K = x2.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M:
        block_m, block_n, block_k, warps, stages = tile_config(N, K, x.dtype)
        grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
        _matmul_kernel[grid](
            x2,
            weight,
            bias if bias is not None else weight,
            y,
            M,
            N,
            K,
            x2.stride(0),
            weight.stride(0),
            y.stride(0),
            HAS_BIAS=bias is not None,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            GROUP_M=8,
            num_warps=warps,
            num_stages=stages,
        )
    return y.view(*x.shape[:-1], N)
