"""Part 8a: weight-only quantization - symmetric INT8 per output channel, group-wise INT4.

A decode step at small batch reads every weight once and does two FLOPs with it, so
its time is bounded by ``bytes of weights / memory bandwidth`` (the roofline's
memory-bound side). Storing weights in 8 or 4 bits instead of 16 cuts those bytes by
2x or about 4x; activations stay in floating point ("weight-only", W8A16 / W4A16).

Symmetric quantization of a group of numbers ``w`` with ``b`` bits (``qmax = 2**(b-1) - 1``)::

    scale = max|w| / qmax          (one float per group)
    q     = round(w / scale)       an integer in [-qmax, qmax]
    w_hat = q * scale              |w - w_hat| <= scale / 2 for every element

The rounding error of one element is at most half a step (``scale / 2``), and the step
is set by the group's largest magnitude, so a group should be small where magnitudes
vary a lot. Two groupings are used here:

* INT8, **per output channel**: one scale per row of the ``[out, in]`` weight (LLM.int8(),
  Dettmers et al. 2022, call it vector-wise; torchao's ``Int8WeightOnlyConfig`` does the
  same). One row produces one output feature, so its scale factors out of the dot
  product: ``y[n] = scale[n] * sum_k q[n, k] x[k]``.
* INT4, **group-wise**: 16 levels are too few for a whole row, so each row is cut into
  groups of ``group_size`` consecutive input columns (32, 64 or 128; GPTQ and AWQ use
  128, torchao's ``Int4WeightOnlyConfig`` defaults to 128) with one scale each.

Rounding is round-half-to-even (``torch.round``), which is odd-symmetric:
``quantize(-w) == -quantize(w)``. The range is ``[-qmax, qmax]`` (the INT8 code -128 and
the INT4 code -8 are never produced), so ``+max|w|`` and ``-max|w|`` are both exact.

INT4 storage: two 4-bit codes per ``uint8`` byte. A code ``q`` in ``[-7, 7]`` is stored
as the *unsigned nibble* ``q + 8`` (``1..15``). Along the input dimension, column
``2j`` goes in the **low** nibble of byte ``j`` and column ``2j + 1`` in the **high**
nibble: ``byte = (q[2j] + 8) | ((q[2j + 1] + 8) << 4)``.

All-zero rows or groups would give ``scale = 0`` and a division by zero; their scale is
set to 1.0 instead (any positive number works: every code is 0 and dequantizes to 0).
Scales are float32 here (real kernels often keep them in bf16/fp16).

:class:`QuantLinear` is the ``nn.Linear`` replacement the engine swaps in
(``LLM(..., quantization="int8" | "int4")``, vLLM's option name; see
``servinglab/model/quant.py``). It keeps only the packed codes and scales and, in each
forward, dequantizes the weight to the activation dtype and calls ``F.linear``: simple
and exact (for float32 activations it equals ``F.linear(x, dequantized_weight)``) but not
faster; a fused kernel dequantizes inside the matrix product instead (vLLM's Marlin,
torchao's tinygemm, PyTorch's ``_weight_int8pack_mm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT8_QMAX = 127
INT4_QMAX = 7
INT4_OFFSET = 8  # stored nibble = code + 8, in 1..15
INT4_GROUP_SIZES = (32, 64, 128)
METHODS = ("int8", "int4")


def _check_weight(weight: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``weight`` is a 2-D floating-point ``[out, in]`` tensor."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 2-D floating-point [out_features, in_features] tensor, got {shape}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8 quantization of a ``[out, in]`` weight.

    Args:
        weight: ``[out_features, in_features]`` floating point (any float dtype; the math
            is done in float32).

    Returns:
        ``(q, scales)``: ``q`` int8 ``[out, in]`` with values in ``[-127, 127]``,
        ``scales`` float32 ``[out]``, ``scales[n] = max_k |weight[n, k]| / 127`` (1.0 for an
        all-zero row). Every row's largest magnitude maps to ``+-127``, and
        ``|weight - q * scales[:, None]| <= scales[:, None] / 2`` elementwise.

    Raises:
        ValueError: naming ``weight`` if it is not a 2-D floating-point tensor.
    """
    # Hints: amax over dim 1 in float32; replace zero scales by 1.0 (torch.where);
    # torch.round rounds half to even (symmetric); clamp to [-127, 127] before .to(int8).
    ### BEGIN SOLUTION
    _check_weight(weight)
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / INT8_QMAX, torch.ones_like(absmax))
    q = torch.round(w / scales[:, None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return q, scales
    ### END SOLUTION


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scales[:, None]`` computed in float32, returned in ``dtype`` (``[out, in]``).

    Raises:
        ValueError: naming ``q`` if it is not a 2-D int8 tensor, or ``scales`` if its
            shape is not ``[q.shape[0]]``.
    """
    ### BEGIN SOLUTION
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    if tuple(scales.shape) != (q.shape[0],):
        raise ValueError(f"scales must have shape [{q.shape[0]}] (one per output row), got {tuple(scales.shape)}")
    return (q.float() * scales.float()[:, None]).to(dtype)
    ### END SOLUTION


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack signed 4-bit codes two per byte along the last dimension.

    Args:
        codes: integer tensor ``[..., K]`` with values in ``[-8, 7]`` and ``K`` even.

    Returns:
        uint8 ``[..., K // 2]``; byte ``j`` holds ``codes[..., 2j] + 8`` in its low
        nibble and ``codes[..., 2j + 1] + 8`` in its high nibble.

    Raises:
        ValueError: naming ``codes`` if it is not an integer tensor, its last
            dimension is odd, or a value lies outside ``[-8, 7]``.
    """
    # Hints: shift to unsigned with + 8 (in a wider int type), take the even and odd
    # columns with slicing [..., 0::2] / [..., 1::2], combine with | and << 4.
    ### BEGIN SOLUTION
    if codes.is_floating_point() or codes.dtype == torch.bool or codes.dim() < 1:
        raise ValueError(f"codes must be an integer tensor with at least one dimension, got {codes.dtype}")
    if codes.shape[-1] % 2:
        raise ValueError(f"codes' last dimension must be even to pack two per byte, got {codes.shape[-1]}")
    wide = codes.to(torch.int16)
    if wide.numel() and (int(wide.min()) < -INT4_OFFSET or int(wide.max()) > INT4_OFFSET - 1):
        raise ValueError(f"codes must lie in [-8, 7], got values in [{int(wide.min())}, {int(wide.max())}]")
    u = wide + INT4_OFFSET
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)
    ### END SOLUTION


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K // 2]`` -> int8 codes ``[..., K]`` in ``[-8, 7]``.

    Raises:
        ValueError: naming ``packed`` if it is not a uint8 tensor.
    """
    ### BEGIN SOLUTION
    if packed.dtype != torch.uint8 or packed.dim() < 1:
        raise ValueError(f"packed must be a uint8 tensor with at least one dimension, got {packed.dtype}")
    wide = packed.to(torch.int16)
    low, high = wide & 0x0F, wide >> 4
    codes = torch.stack((low, high), dim=-1).flatten(-2) - INT4_OFFSET
    return codes.to(torch.int8)
    ### END SOLUTION


def check_group_size(group_size: int, in_features: int) -> None:
    """Raise ``ValueError`` naming ``group_size`` unless it is one of 32, 64, 128 and divides ``in_features``."""
    ### BEGIN SOLUTION
    if group_size not in INT4_GROUP_SIZES or isinstance(group_size, bool):
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} must divide in_features={in_features} "
            f"(the weight's second dimension); pick one of {INT4_GROUP_SIZES} that does"
        )
    ### END SOLUTION


def quantize_int4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric group-wise INT4 quantization, two codes packed per byte.

    Args:
        weight: ``[out, in]`` floating point.
        group_size: consecutive input columns sharing one scale: 32, 64 or 128, and it
            must divide ``in``.

    Returns:
        ``(packed, scales)``: ``packed`` uint8 ``[out, in // 2]`` (see :func:`pack_int4`),
        ``scales`` float32 ``[out, in // group_size]``,
        ``scales[n, g] = max |weight[n, g*G:(g+1)*G]| / 7`` (1.0 for an all-zero group).
        Codes lie in ``[-7, 7]``; each group's largest magnitude maps to ``+-7``, and
        every element is within half its group's step of its original value.

    Raises:
        ValueError: naming ``weight`` (not 2-D floating point) or ``group_size`` (not one
            of 32, 64, 128, or not dividing ``in``; the message names ``in_features``).
    """
    # Hints: view the weight as [out, in // G, G] so each group is one row of the last
    # dimension; compute codes like INT8 with qmax 7; view back to [out, in]; pack_int4.
    ### BEGIN SOLUTION
    _check_weight(weight)
    out_features, in_features = weight.shape
    check_group_size(group_size, in_features)
    w = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    absmax = w.abs().amax(dim=-1)
    scales = torch.where(absmax > 0, absmax / INT4_QMAX, torch.ones_like(absmax))
    codes = torch.round(w / scales[..., None]).clamp(-INT4_QMAX, INT4_QMAX).to(torch.int8)
    return pack_int4(codes.reshape(out_features, in_features)), scales
    ### END SOLUTION


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack and rescale: ``[out, in // 2]`` uint8 and ``[out, in // G]`` scales -> ``[out, in]`` in ``dtype``.

    The product ``code * scale`` is computed in float32, then cast to ``dtype``.

    Raises:
        ValueError: naming ``packed`` (not 2-D uint8), ``group_size`` (see
            :func:`check_group_size`) or ``scales`` (shape not ``[out, in // group_size]``).
    """
    ### BEGIN SOLUTION
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    out_features, in_features = packed.shape[0], 2 * packed.shape[1]
    check_group_size(group_size, in_features)
    groups = in_features // group_size
    if tuple(scales.shape) != (out_features, groups):
        raise ValueError(f"scales must have shape [{out_features}, {groups}] (out, in // group_size), got {tuple(scales.shape)}")
    codes = unpack_int4(packed).float().reshape(out_features, groups, group_size)
    return (codes * scales.float()[..., None]).reshape(out_features, in_features).to(dtype)
    ### END SOLUTION


class QuantLinear(nn.Module):
    """A weight-only quantized ``nn.Linear``: stores codes + scales, computes in the activation dtype.

    Build one with :meth:`from_linear`. Buffers (saved in ``state_dict``):

    * ``qweight``: int8 ``[out, in]`` (``int8``) or uint8 ``[out, in // 2]`` (``int4``),
    * ``scales``: float32 ``[out]`` (``int8``) or ``[out, in // group_size]`` (``int4``),
    * ``bias``: the original bias (same dtype) or ``None``.

    Attributes ``in_features``, ``out_features``, ``method`` (``"int8"`` / ``"int4"``) and
    ``group_size`` (``None`` for int8) describe it. ``forward(x)`` must equal
    ``F.linear(x, self.dequantized_weight(x.dtype), self.bias)`` (exactly, for float32 ``x``).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int | None,
                 qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = method, group_size
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int = 128) -> QuantLinear:
        """Quantize ``linear.weight`` with ``method`` (``"int8"`` or ``"int4"``; ``group_size`` is used by int4 only).

        The new module lives on ``linear``'s device; the original is left unchanged.

        Raises:
            ValueError: naming ``method`` (allowed: ``("int8", "int4")``) or ``group_size``.
        """
        ### BEGIN SOLUTION
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        weight = linear.weight
        if method == "int8":
            qweight, scales = quantize_int8(weight)
            group = None
        else:
            qweight, scales = quantize_int4(weight, group_size)
            group = group_size
        return cls(linear.in_features, linear.out_features, method, group, qweight, scales, linear.bias)
        ### END SOLUTION

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[out, in]`` weight the codes stand for, in ``dtype``."""
        ### BEGIN SOLUTION
        if self.method == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.group_size, dtype)
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_hat.T + bias`` with ``W_hat`` dequantized to ``x.dtype`` (``[..., in]`` -> ``[..., out]``)."""
        ### BEGIN SOLUTION
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)
        ### END SOLUTION

    def weight_nbytes(self) -> int:
        """Bytes of the stored codes and scales (what a decode step reads instead of the weight)."""
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{group}"
