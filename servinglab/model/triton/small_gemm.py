"""``x @ w.T`` for a handful of rows: the decode step's projections at small batch.

At batch 1..16 a decode step's matrix products are matrix-*vector* products in all
but name: each weight element is read once and used for one to sixteen rows, so the
time is the time to stream the weight (SmolLM2-135M's ``gate_up``: 3.5 MB, under a
microsecond at 4.8 TB/s), plus how long one program waits on memory. cuBLAS picks
tiles for general shapes, and for these it ran about 3.9 us a product on an H200
(``torch.profiler`` over a batch-1 decode graph of the 135M model), several times the
streaming time.

This kernel gives each program ``BLOCK_N`` output columns and walks ``K`` in
``BLOCK_K`` steps; the rows (padded to 16, the smallest ``tl.dot``) and the weight tile
meet in one ``tl.dot``, accumulating in float32. The software pipeline
(``num_stages``) keeps several weight tiles in flight per program, which is what a
latency-bound stream needs. ``BLOCK_K`` is fixed, so the reduction order, hence the
result, does not depend on ``BLOCK_N`` or the warp count. With ``gated=True`` it is the
MLP's ``gate_up`` product and SwiGLU in one kernel: each program computes the gate
and the up tile of the same columns and writes ``silu(gate) * up``.

Folding the RMSNorm in front of qkv and gate_up into this kernel as well (a per-row
scale applied after the product, 60 launches fewer per step) was tried and dropped:
on the H200 the extra element-wise work inside the loop made the 90 products of a
batch-1 step take 512-674 us instead of 302 us, more than the 98 us of norms it saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 16  # rows per tile: tl.dot's minimum; rows beyond M are masked
BLOCK_K = 64
SMALL_M_MAX = 16  # the largest row count this kernel serves (gpu_ops' dispatch)


@triton.jit
def _small_gemm_kernel(
    x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    GATED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    # GATED: the weight is gate_up [2N, K]; row j of the up half sits N rows below gate row j.
    up_rows = w_rows + N * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
        k_mask = (k0 + offs_k) < K
        x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + (k0 + offs_k)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if GATED:
            u = tl.load(up_rows + (k0 + offs_k)[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc_up = tl.dot(x, tl.trans(u), acc_up, input_precision=DOT_PRECISION)
    dtype = out_ptr.dtype.element_ty
    if GATED:
        # SwiGLU epilogue, rounded like the unfused path (gate and up stored in the
        # activation dtype, then silu(gate) * up in float32, rounded once).
        gate = acc.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        result = gate / (1.0 + tl.exp(-gate)) * up
    else:
        result = acc
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, result.to(dtype), mask=m_mask[:, None] & n_mask[None, :])


def default_block_n(n: int) -> int:
    """Output columns per program: 16 for narrow outputs, 32 beyond 1024 (H200 sweep, 2026-12-02)."""
    return 16 if n <= 1024 else 32


def worth_it(m: int, n: int, k: int) -> bool:
    """Whether :func:`small_gemm` beats cuBLAS for ``[m, k] @ [n, k].T``.

    Measured on an H200 (bf16, CUDA-graph replays over weights larger than L2): it won
    for SmolLM2-135M's qkv, o and gate_up at 1..16 rows (2.7 vs 3.2-3.6 us, 3.9 vs
    4.2 us), and lost for long reductions (``down``, K = 1536: 4.7 vs 4.6 us) and for
    every SmolLM2-1.7B projection, where cuBLAS already streams the weight near the
    bandwidth (``down`` K = 8192: 21.6 vs 12.5 us). So: small weights, short K.
    """
    return m <= SMALL_M_MAX and k <= 1024 and n * k <= 2 * 1024 * 1024


def small_gemm(
    x: torch.Tensor, weight: torch.Tensor, gated: bool = False, block_n: int | None = None, num_stages: int = 6,
) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[M, K]`` with ``M <= SMALL_M_MAX`` (``F.linear`` without bias).

    Args:
        x: activations, last dimension contiguous.
        weight: ``[N, K]``, contiguous rows (an ``nn.Linear`` weight).
        gated: ``weight`` is a fused ``gate_up`` ``[2I, K]``; return ``silu(gate) * up``
            ``[M, I]`` (SwiGLU) without writing the ``[M, 2I]`` product.
        block_n: output columns per program (default :func:`default_block_n`).
        num_stages: weight tiles in flight per program.
    """
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if weight.shape[1] != k or x.stride(-1) != 1 or weight.stride(-1) != 1 or (gated and weight.shape[0] % 2):
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [M, K] and [N, K] (N even when gated), rows contiguous")
    if m > SMALL_M_MAX:
        raise ValueError(f"small_gemm serves at most {SMALL_M_MAX} rows, got {m}: use F.linear")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    # Gated: each program streams a gate and an up tile, so half the columns for the same bytes.
    block_n = block_n or (default_block_n(2 * n) // 2 if gated else default_block_n(n))
    _small_gemm_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=BLOCK_K, NUM_STAGES=num_stages, GATED=gated,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
    )
    return out
