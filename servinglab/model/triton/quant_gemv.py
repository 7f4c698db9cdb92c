"""One activation row times INT8 / INT4 (or e4m3) codes, without tensor cores (the batch-1 decode product).

At ``M = 1`` a ``tl.dot`` tile pads the row to 16 and routes the codes through the
tensor cores' operand layouts; a matrix-vector product needs neither. Each program
here owns ``BLOCK_N`` weight rows and a slice of K, loads ``[BLOCK_N, BLOCK_K]`` code
tiles with wide contiguous loads along K, multiplies them by the activation element by
element into a float32 ``[BLOCK_N, BLOCK_K]`` accumulator (no reduction inside the loop),
and reduces across K once at the end. INT4 scales are applied per element (each
nibble's group scale, read through L1), so any ``BLOCK_K`` works, not only one group;
or, with ``GROUPED``, once per group: the products are summed within each group of the
tile first, then scaled (one scale load per group instead of one per byte: a quarter of
the bytes the per-element loads move through L1 for ``G = 64``).
Split-K slices are merged in the same launch as in Part 8b's kernel (per-tile counters,
the last slice sums the partials in slice order), so it can be captured in a CUDA graph.

It is one of the candidates :mod:`servinglab.model.quant_gemm` times for one-row
products; the faster one is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _even_odd(x_ptr, k0, BLOCK_K: tl.constexpr):
    """The activations under a tile's low and high nibbles: one contiguous ``BLOCK_K`` load, then
    de-interleaved in registers (two stride-2 loads would each touch every 32-byte sector anyway)."""
    x = tl.load(x_ptr + k0 + tl.arange(0, BLOCK_K)).to(tl.float32)
    return tl.split(tl.reshape(x, [BLOCK_K // 2, 2]))


@triton.jit
def _quant_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, out_ptr, partial_ptr, counter_ptr, N, K, stride_qn, stride_sn,
    INT4: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUPED: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = qweight_ptr + offs_n[:, None].to(tl.int64) * stride_qn
    blocks_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_start = pid_k * blocks_per_split * BLOCK_K
    k_end = tl.minimum(K, k_start + blocks_per_split * BLOCK_K)
    if INT4 and GROUPED:  # BLOCK_K a multiple of GROUP: [BLOCK_N, groups, GROUP / 2] sums, one scale per group
        offs_j = tl.arange(0, BLOCK_K // 2)
        offs_g = tl.arange(0, BLOCK_K // GROUP)
        acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            byte = tl.load(rows + (k0 // 2 + offs_j)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
            x_even, x_odd = _even_odd(x_ptr, k0, BLOCK_K)
            prod = ((byte & 15) - 8).to(tl.float32) * x_even[None, :] + ((byte >> 4) - 8).to(tl.float32) * x_odd[None, :]
            per_group = tl.sum(tl.reshape(prod, [BLOCK_N, BLOCK_K // GROUP, GROUP // 2]), 2)
            scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + (k0 // GROUP + offs_g)[None, :], mask=n_mask[:, None], other=0.0)
            acc += per_group * scale
        total = tl.sum(acc, 1)
    elif INT4:
        offs_j = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros([BLOCK_N, BLOCK_K // 2], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            byte = tl.load(rows + (k0 // 2 + offs_j)[None, :], mask=n_mask[:, None], other=0).to(tl.int32)
            x_even, x_odd = _even_odd(x_ptr, k0, BLOCK_K)
            scale = tl.load(scales_ptr + offs_n[:, None] * stride_sn + (k0 + 2 * offs_j)[None, :] // GROUP,
                            mask=n_mask[:, None], other=0.0)
            low = ((byte & 15) - 8).to(tl.float32)
            high = ((byte >> 4) - 8).to(tl.float32)
            acc += (low * x_even[None, :] + high * x_odd[None, :]) * scale
        total = tl.sum(acc, 1)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            # No ``other``: an integer fill cannot be cast to e4m3 codes (quantization="fp8"), and rows past N
            # only feed their own, never stored, outputs.
            q = tl.load(rows + (k0 + offs_k)[None, :], mask=n_mask[:, None]).to(tl.float32)
            x = tl.load(x_ptr + k0 + offs_k).to(tl.float32)
            acc += q * x[None, :]
        total = tl.sum(acc, 1) * tl.load(scales_ptr + offs_n, mask=n_mask, other=0.0)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_mask)
    else:
        tl.store(partial_ptr + pid_k * N + offs_n, total, mask=n_mask)
        arrived = tl.atomic_add(counter_ptr + pid_n, 1)
        if arrived == SPLIT_K - 1:
            summed = tl.zeros([BLOCK_N], tl.float32)
            for s in range(0, SPLIT_K):
                summed += tl.load(partial_ptr + s * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs_n, summed.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)


def quant_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None, counters: torch.Tensor,
               block_n: int = 32, block_k: int = 256, split_k: int = 1, num_warps: int = 4, num_stages: int = 3,
               grouped: int = 0) -> torch.Tensor:
    """``x @ dequantize(qweight, scales).T`` for ``x`` ``[1, K]`` (operands as Part 8b's ``quant_matmul`` takes them).

    ``counters``: int32 zeros, at least ``cdiv(N, block_n)`` of them (left at zero).
    ``block_k`` must divide ``K``; ``grouped`` (INT4): scale once per group, ``block_k`` then a
    multiple of the group size, both powers of two.
    """
    n, k = qweight.shape[0], x.shape[1]
    if x.shape[0] != 1 or k % block_k or x.stride(-1) != 1:
        raise ValueError(f"quant_gemv takes one contiguous row and block_k dividing K, got x {tuple(x.shape)}, block_k={block_k}")
    if grouped and (group_size is None or block_k % group_size or (block_k // group_size) & (block_k // group_size - 1)):
        raise ValueError(f"grouped needs INT4 and block_k a power-of-two multiple of the group size, got block_k={block_k}, "
                         f"group_size={group_size}")
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split_k)
    if counters.numel() < grid[0]:
        raise ValueError(f"counters must hold at least {grid[0]} entries, got {counters.numel()}")
    partial = torch.empty((split_k, n) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    _quant_gemv_kernel[grid](
        x, qweight, scales, out, partial, counters, n, k, qweight.stride(0), scales.stride(0),
        INT4=group_size is not None, GROUP=group_size or 1, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        GROUPED=bool(grouped), num_warps=num_warps, num_stages=num_stages,
    )
    return out
