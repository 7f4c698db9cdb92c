"""Dynamic per-token FP8 (e4m3) activation quantization in one pass (vLLM's ``dynamic_per_token_scaled_fp8_quant``).

FP8 GEMMs (``torch._scaled_mm``) want the activation in e4m3 with a scale per row:
``scale = max|x_row| / 448`` and ``x8 = x / scale``. Written as PyTorch ops this is
``x.float()``, ``abs``, ``amax``, a division and a cast: five passes over ``[M, K]``, three
of them in float32, which at prefill-sized ``M`` cost a good part of what the FP8 GEMM
saves (``servinglab bench quant --device cuda``: the unfused row). Here one program owns a
row: it reads it once in bf16/fp16, keeps it in registers, reduces the max, and writes the
e4m3 codes (one byte each) and the float32 scale: 2 bytes in and 1 out per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

E4M3_MAX = 448.0  # largest finite float8_e4m3fn (OCP FP8 spec)


@triton.jit
def _fp8_rows_kernel(x_ptr, out_ptr, scale_ptr, K, stride_x, stride_o, FMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-12) / FMAX  # a zero row gets a tiny scale, not a division by 0
    codes = tl.clamp(x / scale, -FMAX, FMAX)  # rounding can land a hair above FMAX; e4m3fn has no infinity
    tl.store(out_ptr + row * stride_o + offs, codes.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[M, K]`` -> (``x8`` ``[M, K]`` float8_e4m3fn, ``scale`` ``[M, 1]`` float32), ``x ~= x8 * scale``.

    Raises:
        ValueError: ``x`` not 2-D with contiguous rows, or ``K`` above 16384 (one row per program, in registers).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with contiguous rows, got shape {tuple(x.shape)}")
    m, k = x.shape
    if k > 16384:
        raise ValueError(f"quantize_rows_fp8 keeps a row in registers: K must be <= 16384, got {k}")
    out = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _fp8_rows_kernel[(m,)](x, out, scale, k, x.stride(0), out.stride(0), FMAX=E4M3_MAX, BLOCK_K=block,
                               num_warps=8 if block >= 4096 else 4)
    return out, scale
