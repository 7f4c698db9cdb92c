"""RMSNorm, optionally fused with the residual add before it (vLLM's ``fused_add_rms_norm``).

A pre-norm decoder computes ``residual = residual + sublayer_out`` and then
``norm(residual)`` twice per layer: fused, the row is read once and written twice
(new residual, normalised output) instead of three separate kernels' traffic.
The arithmetic follows transformers' ``LlamaRMSNorm`` step by step (add in the model
dtype, normalise in float32, round, multiply by the weight in the model dtype); only
the sum of squares runs in another order, so results agree with the PyTorch layer
within float32 rounding before the final cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, stride_x, stride_r, stride_o, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # rounded like `x + residual`
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * inv_rms).to(x.dtype)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * normalise(x)`` over the last dim of ``x`` ``[T, hidden]``.

    With ``residual`` (same shape, contiguous rows), first ``residual += x`` in place
    and normalise the sum: the caller keeps ``residual`` as the stream's new value.
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [T, hidden] with contiguous rows, got shape {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must match x {tuple(x.shape)}, got {tuple(residual.shape)}")
    num_rows, hidden = x.shape
    out = torch.empty_like(x)
    if num_rows == 0:
        return out
    res = residual if residual is not None else x
    _rmsnorm_kernel[(num_rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden), num_warps=4,
    )
    return out
