# Exercise stub generated from solutions/quant_gemm_triton.py by scripts/make_exercises.py.
# Fill in every `raise NotImplementedError` below; keep the signatures.
"""Part 8b: a fused dequantizing matrix product (W8A16 / W4A16) in Triton.

Part 8a's ``QuantLinear`` dequantizes its whole weight to bf16 in every forward, then
calls ``F.linear``: a decode step then reads the codes, *writes* a bf16 weight and reads
it again, more bytes than the bf16 model it replaced. The fix is the one vLLM's Marlin,
torchao's tinygemm and PyTorch's ``_weight_int8pack_mm`` apply: load the codes tile by
tile inside the matrix product's K loop, turn them into numbers in registers, and never
write a dequantized weight anywhere. A decode step (a few rows) is bound by the bytes it
reads, so 1 byte (INT8) or half a byte (INT4) a weight instead of 2 is up to 2x or 4x
less time (the roofline's memory-bound side).

``out[m, n] = sum_k x[m, k] * w_hat[n, k]`` with Part 8a's layouts:

* INT8: ``qweight`` int8 ``[N, K]``, ``scales`` float32 ``[N]``:
  ``w_hat[n, k] = q[n, k] * scales[n]``. The scale of a row factors out of its dot
  product, so the kernel sums ``x * q`` and multiplies by ``scales[n]`` once at the end.
* INT4: ``qweight`` uint8 ``[N, K // 2]``, ``scales`` float32 ``[N, K // G]``: byte ``j``
  of row ``n`` holds ``q[n, 2j] + 8`` in its **low** nibble and ``q[n, 2j + 1] + 8`` in its
  **high** nibble. A scale now belongs to one group of ``G`` columns, so it factors out
  of each *group's* partial sum: the kernel takes ``BLOCK_K`` columns (``BLOCK_K``
  divides ``G``, so a block lies inside one group), computes ``x . q`` over the block in
  float32 and multiplies that by the block's group scale before adding it to the
  accumulator. Rather than interleaving the two nibbles back into columns, it pairs
  them with the activations they belong to: low nibbles with the even columns of ``x``,
  high nibbles with the odd ones (two ``tl.dot`` of ``BLOCK_K / 2`` each).

Codes are small integers (``|q| <= 127``), exact in bf16/fp16, so ``tl.dot`` of the
activations with the codes in the activation dtype is exact up to its float32
accumulation; the scales are applied in float32.

Two shapes of the same kernel (``grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K)``):

* **decode (M <= 16), split-K**: one row block of 16 (``tl.dot``'s minimum); the N
  axis alone gives too few programs to keep 132 SMs streaming (2048 outputs / 32 = 64
  programs), so the K axis is cut into ``SPLIT_K`` slices too. Each slice writes its
  float32 partial tile to a workspace and counts itself in on a per-tile counter
  (``tl.atomic_add``); the slice that arrives last sums the ``SPLIT_K`` partials in a
  fixed order (so the result does not depend on which slice finished first), writes the
  output and resets the counter to 0 for the next launch. One launch, no memset: it
  can be captured in a CUDA graph (CUTLASS calls this "serial split-K").
* **larger M, tiled**: ``BLOCK_M x BLOCK_N`` tiles of 32..128 and ``SPLIT_K = 1``; each
  weight tile is read once per row block and used for ``BLOCK_M`` rows.

On a CPU the kernel runs through Triton's interpreter (``TRITON_INTERPRET=1``, see Part
3b), so it is graded on a laptop with small float32 shapes; the speed checks need CUDA.
The engine's launcher (``servinglab/model/quant_gemm.py``) picks the block sizes and the
split count per shape by measuring a few candidates before the CUDA graphs are captured.

Triton reminders (besides Part 3b's): ``tl.dot(a, b)`` of ``[M, K] x [K, N]`` tiles, each
side at least 16; integer tensors support ``&``, ``>>`` and ``.to(tl.int32)``;
``tl.atomic_add(ptr, 1)`` returns the value *before* the add; a scalar ``if`` on a
loaded value works inside a kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SMALL_M_MAX = 16  # rows served by the split-K decode shape (one 16-row block)
_counters: dict[torch.device, torch.Tensor] = {}  # per-device tile counters, kept at 0 between launches


@triton.jit
def quant_matmul_kernel(
    x_ptr, qweight_ptr, scales_ptr, out_ptr, partial_ptr, counter_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sn, stride_om,
    INT4: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """``out = x @ w_hat.T`` for one ``BLOCK_M x BLOCK_N`` tile and one K slice.

    Args:
        x_ptr: ``[M, K]`` activations (bf16, fp16 or float32), last dimension contiguous.
        qweight_ptr: int8 ``[N, K]`` (``INT4`` false) or uint8 ``[N, K // 2]`` (``INT4``),
            rows ``stride_qn`` apart.
        scales_ptr: float32 ``[N]`` or ``[N, K // GROUP]`` (rows ``stride_sn`` apart).
        out_ptr: ``[M, N]`` output in the activation dtype, rows ``stride_om`` apart.
        partial_ptr: float32 workspace ``[SPLIT_K, M, N]`` (contiguous; unused when
            ``SPLIT_K == 1``).
        counter_ptr: int32 per-tile counters, all 0 on entry; tile ``(pid_m, pid_n)`` is
            counter ``pid_m * num_programs(1) + pid_n``; leave them at 0.
        INT4, GROUP: the format; ``GROUP`` is the INT4 group size (``BLOCK_K`` divides it).
        BLOCK_K: columns per step of the K loop; ``K`` is a multiple of it.
        SPLIT_K: K slices; slice ``s`` = ``tl.program_id(2)`` covers blocks
            ``s * cdiv(K / BLOCK_K, SPLIT_K)`` onwards (possibly none: it still counts in).
        DOT_PRECISION: ``"ieee"`` for float32 activations (exact), else ``"tf32"``.
    """
    # Hints: offs_m / offs_n as in any tiled matmul, masked against M and N.
    # INT8: load a [BLOCK_K, BLOCK_N] tile of codes (qweight_ptr + n * stride_qn + k),
    # cast it to x's dtype (x.dtype) and tl.dot; multiply by scales[n] after the loop.
    # INT4: offs_j = tl.arange(0, BLOCK_K // 2) indexes bytes; x's even columns are
    # k0 + 2 * offs_j, the odd ones k0 + 2 * offs_j + 1; low = (byte & 15) - 8, high =
    # (byte >> 4) - 8; the block's scale is scales[n, k0 // GROUP].
    # Epilogue: SPLIT_K == 1 stores directly; otherwise store the partial tile, then
    # `arrived = tl.atomic_add(counter_ptr + tile, 1)`; `if arrived == SPLIT_K - 1:` sum
    # the partials (tl.load(..., cache_modifier=".cg") reads past the L1 cache), store,
    # and tl.atomic_xchg(counter_ptr + tile, 0).
    raise NotImplementedError("quant_matmul_kernel: your code here")


def default_config(m: int, n: int, k: int, group_size: int | None) -> dict[str, int]:
    """Block sizes for ``[m, k] x [n, k]^T`` without measuring: split-K for decode rows, tiles otherwise.

    ``block_k`` is 64 for INT8 and ``min(64, group_size)`` for INT4 (it must divide the
    group); the split count gives about 256 programs at decode without slices shorter
    than 4 blocks.
    """
    block_k = 64 if group_size is None else min(64, group_size)
    if m <= SMALL_M_MAX:
        block_n = 32 if n <= 4096 else 64
        programs = triton.cdiv(n, block_n)
        split = max(1, min(256 // max(programs, 1), k // (4 * block_k)))
        return dict(block_m=16, block_n=block_n, block_k=block_k, split_k=split, num_warps=4, num_stages=4)
    block_m = 32 if m <= 64 else 64
    return dict(block_m=block_m, block_n=64 if m <= 64 else 128, block_k=block_k, split_k=1, num_warps=4, num_stages=3)


def _counters_for(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's zeroed tile counters (grown outside graph capture only)."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"quant_matmul needs {tiles} split-K counters during CUDA graph capture: run it once before capturing")
        buf = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def check_operands(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> tuple[int, int, int]:
    """``(M, N, K)`` of a fused product, or ``ValueError`` naming the operand that does not fit."""
    if x.dim() != 2 or not x.is_floating_point() or x.stride(-1) != 1:
        raise ValueError(f"x must be a 2-D floating-point [M, K] tensor with a contiguous last dimension, got {tuple(x.shape)}")
    m, k = x.shape
    if group_size is None:
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != k:
            raise ValueError(f"qweight must be int8 [N, {k}] for INT8 (group_size=None), got {qweight.dtype} {tuple(qweight.shape)}")
        want = (qweight.shape[0],)
    else:
        if group_size not in (32, 64, 128) or k % group_size:
            raise ValueError(f"group_size must be one of (32, 64, 128) and divide K={k}, got {group_size!r}")
        if qweight.dtype != torch.uint8 or qweight.dim() != 2 or 2 * qweight.shape[1] != k:
            raise ValueError(f"qweight must be uint8 [N, {k // 2}] for INT4, got {qweight.dtype} {tuple(qweight.shape)}")
        want = (qweight.shape[0], k // group_size)
    if tuple(scales.shape) != want or scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32 {list(want)}, got {scales.dtype} {tuple(scales.shape)}")
    if qweight.stride(-1) != 1 or x.device != qweight.device or x.device != scales.device:
        raise ValueError("x, qweight and scales must be on one device and qweight's rows contiguous")
    return m, qweight.shape[0], k


def quant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int | None = None, *,
    block_m: int | None = None, block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
) -> torch.Tensor:
    """``x @ dequantize(qweight, scales).T`` in one launch, never materialising the dequantized weight.

    Args:
        x: ``[M, K]`` activations (bf16, fp16; float32 is exact and what the CPU tests use).
        qweight, scales: Part 8a's INT8 (``group_size=None``) or INT4 codes and scales.
        group_size: ``None`` for INT8, else the INT4 group (32, 64 or 128).
        block_m, block_n, block_k, split_k, num_warps, num_stages: launch configuration;
            ``None`` takes :func:`default_config`'s value. ``block_k`` must divide ``K``
            (and the INT4 group); ``block_m``, ``block_n`` >= 16; ``block_k`` >= 32 for INT4.

    Returns:
        A new ``[M, N]`` tensor in ``x``'s dtype and device.

    Raises:
        ValueError: naming the operand or the launch parameter that does not fit.
    """
    m, n, k = check_operands(x, qweight, scales, group_size)
    cfg = default_config(m, n, k, group_size)
    given = dict(block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps, num_stages=num_stages)
    cfg.update({key: value for key, value in given.items() if value is not None})
    bk = cfg["block_k"]
    if k % bk or (group_size is not None and (group_size % bk or bk < 32)) or bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_k={bk} must be a power of two >= 16 dividing K={k} (and the INT4 group {group_size}, >= 32)")
    if cfg["split_k"] < 1 or min(cfg["block_m"], cfg["block_n"]) < 16:
        raise ValueError(f"split_k must be >= 1 and block_m, block_n >= 16, got {cfg}")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    grid = (triton.cdiv(m, cfg["block_m"]), triton.cdiv(n, cfg["block_n"]), cfg["split_k"])
    partial = torch.empty((cfg["split_k"], m, n) if cfg["split_k"] > 1 else (1,), dtype=torch.float32, device=x.device)
    counters = _counters_for(x.device, grid[0] * grid[1])
    quant_matmul_kernel[grid](
        x, qweight, scales, out, partial, counters, m, n, k,
        x.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
        INT4=group_size is not None, GROUP=group_size or 1,
        BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_K=bk, SPLIT_K=cfg["split_k"],
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
