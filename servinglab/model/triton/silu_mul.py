"""SiLU-and-multiply of the gated MLP (SwiGLU, Shazeer 2020): ``silu(gate) * up``.

The fused ``gate_up_proj`` writes ``[T, 2I]`` (gate, then up); one pass reads both
halves and writes ``[T, I]``, instead of a SiLU kernel, a multiply kernel and the
intermediate between them (vLLM's ``silu_and_mul``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[T, 2I]`` (gate | up) -> ``[T, I]`` = ``silu(gate) * up``."""
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, 2 * intermediate] with contiguous rows, got {tuple(x.shape)}")
    num_rows, width = x.shape
    out = torch.empty(num_rows, width // 2, dtype=x.dtype, device=x.device)
    if num_rows:
        _silu_mul_kernel[(num_rows, triton.cdiv(width // 2, BLOCK))](x, out, x.stride(0), out.stride(0), width // 2, BLOCK=BLOCK)
    return out
