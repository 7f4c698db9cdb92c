"""FP8 (e4m3) projections for ``LLM(..., quantization="fp8")`` on GPUs with FP8 tensor cores.

vLLM's ``quantization="fp8"`` on Hopper: each projection's weight is stored as e4m3 codes
(one byte a weight) with one float32 scale per output channel, ``w[n, :] ~= q[n, :] * s[n]``
(``s[n] = max|w[n, :]| / 448``, 448 the largest finite e4m3). The product then takes one of
two routes, by the number of rows ``M`` it multiplies, because the roofline has two regimes
(``servinglab bench quant --device cuda``, its projections table):

* ``M == 1`` (batch-1 decode, memory-bound): **weight-only**. The GEMV of
  :mod:`servinglab.model.triton.quant_gemv` reads the codes (half of bf16's bytes), widens
  them to float32 in registers and multiplies by the bf16 activation; the scale is applied
  once per output. No tensor cores, no activation rounding: the speed-up is the byte
  ratio, as for INT8.
* ``M >= 2``: **W8A8**. The activation is quantized to e4m3 with one scale per row in one
  Triton pass (:mod:`servinglab.model.triton.fp8_quant`, vLLM's dynamic per-token scales) and
  ``torch._scaled_mm`` multiplies on the FP8 tensor cores (twice bf16's peak), scaling rows
  and columns in its epilogue. This pays where the product is compute-bound: measured on
  an H200 (1.7B config, all projections of a step as one graph replay) 1.18x bf16 at
  ``M = 512`` and 1.46x at ``M = 8192`` (a prefill chunk), but 0.73-0.85x from ``M = 1`` to
  ``128``, where the activation pass and the GEMM's fixed cost outweigh the halved bytes.

So with ``fp8`` a batch-1 decode and a prefill both gain, and a small decode batch
(2 to a few hundred rows) is slower than bf16: the price of keeping one byte a weight.
``int8`` (Part 8) wins there. Both routes run inside the engine's CUDA graphs.

Rowwise-scaled ``_scaled_mm`` writes bfloat16 only, so ``fp8`` needs ``dtype="bfloat16"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from servinglab.model.triton.fp8_quant import E4M3_MAX

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90): FP8 tensor cores


def fp8_unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``quantization="fp8"`` cannot run on ``device`` in ``dtype``, or ``None`` if it can."""
    if device.type != "cuda":
        return (f"quantization='fp8' needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9); "
                f"the device is {device.type}: use quantization='int8' or 'int4'")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return (f"quantization='fp8' needs compute capability >= 8.9 (Ada, Hopper); this GPU has "
                f"{capability[0]}.{capability[1]}: use quantization='int8' or 'int4'")
    if dtype != torch.bfloat16:
        return f"quantization='fp8' needs dtype='bfloat16' (per-row scaled FP8 GEMMs write bfloat16), got {dtype}"
    return None


class Fp8Linear(nn.Module):
    """A projection with e4m3 weights and one float32 scale per output channel.

    Buffers: ``qweight`` ``[out, in]`` ``float8_e4m3fn`` and ``scales`` ``[out]`` float32 (the
    names Part 8a's ``QuantLinear`` uses, so :func:`~servinglab.model.quant.weight_bytes`
    counts them the same way). ``forward`` multiplies by the dequantized weight (any
    device; the reference). On CUDA the engine calls :func:`fp8_linear` instead.
    """

    method = "fp8"

    def __init__(self, in_features: int, out_features: int, qweight: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if qweight.dtype != torch.float8_e4m3fn or tuple(qweight.shape) != (out_features, in_features):
            raise ValueError(f"qweight must be float8_e4m3fn [{out_features}, {in_features}], got {qweight.dtype} {tuple(qweight.shape)}")
        if scales.dtype != torch.float32 or tuple(scales.shape) != (out_features,):
            raise ValueError(f"scales must be float32 [{out_features}], got {scales.dtype} {tuple(scales.shape)}")
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """Quantize ``linear``'s weight: ``s[n] = max|w[n, :]| / 448``, ``q = e4m3(w / s)`` (round to nearest).

        An all-zero row gets a tiny scale instead of a division by zero (its codes are 0).
        """
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / E4M3_MAX
        codes = (w / scales[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return cls(linear.in_features, linear.out_features, codes, scales, linear.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q * s`` as a ``[out, in]`` tensor of ``dtype`` (computed in float32)."""
        return (self.qweight.float() * self.scales[:, None]).to(dtype)

    def weight_nbytes(self) -> int:
        """Bytes of the codes and the scales."""
        return self.qweight.numel() + 4 * self.scales.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 per-channel"


def fp8_linear(layer: Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` on CUDA: the weight-only GEMV for one row, per-token W8A8 ``_scaled_mm`` for more."""
    from servinglab.model.quant_gemm import quant_linear
    from servinglab.model.triton.fp8_quant import quantize_rows_fp8

    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1:
        return quant_linear(layer, x)  # the GEMV (its tuner keeps to it for e4m3 codes), bias included
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    x8, x_scale = quantize_rows_fp8(flat)
    # qweight [N, K] row-major: its transpose is the column-major [K, N] operand _scaled_mm wants.
    out = torch._scaled_mm(x8, layer.qweight.t(), scale_a=x_scale, scale_b=layer.scales[None, :], out_dtype=torch.bfloat16)
    if layer.bias is not None:
        out = out + layer.bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])
